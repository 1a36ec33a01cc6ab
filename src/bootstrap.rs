//! Orchestration of a native bootstrap (under construction).
