//! Packer's plugin protocol, served natively (no Go): launch and handshake,
//! yamux, the MuxBroker, net/rpc with msgpack bodies, the gob/protobuf
//! ConfigSpec, and the Builder/Ui/Hook/Communicator/Artifact services.

pub mod broker;
pub mod gob;
pub mod proto;
pub mod rpc;
pub mod spec;
pub mod yamux;
pub mod config;
pub mod interp;
