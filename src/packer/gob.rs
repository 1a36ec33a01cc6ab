//! A minimal Go `encoding/gob` encoder for the two gob values the builder
//! protocol needs: the `hcldec.ObjectSpec` returned by `Builder.ConfigSpec`
//! and the `CommandFinished{ExitStatus int}` of a remote command.
//!
//! The layout is canonical: all type definitions first, each in its own
//! message, then the value; user type ids start at 65; zero-valued struct
//! fields are omitted. Go's decoder accepts it (Packer 1.6.6 verified with the
//! same layout); Go's own encoder orders things differently, so compare
//! decoded structure, not bytes, against Go output.

use super::spec::{CtyType, ObjectSpec, Spec};

const T_BOOL: i64 = 1;
const T_INT: i64 = 2;
const T_UINT: i64 = 3;
const T_STRING: i64 = 6;
const T_INTERFACE: i64 = 8;

/// gob name of the nested `hcldec.ObjectSpec` in module builds of Packer.
pub const OBJSPEC_NAME_MODULE: &str = "github.com/hashicorp/hcl/v2/hcldec.ObjectSpec";
/// The same type's name in Debian's GOPATH/vendor build of Packer 1.6.6.
pub const OBJSPEC_NAME_DEBIAN: &str =
    "github.com/hashicorp/packer/vendor/github.com/hashicorp/hcl/v2/hcldec.ObjectSpec";
/// Byte string whose presence in Packer's executable marks the vendor build.
pub const DEBIAN_VENDOR_MARKER: &[u8] =
    b"github.com/hashicorp/packer/vendor/github.com/hashicorp/hcl/v2/hcldec";

fn uint(out: &mut Vec<u8>, u: u64) {
    if u < 0x80 {
        out.push(u as u8);
        return;
    }
    let bytes = u.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    let n = 8 - skip;
    out.push((256 - n) as u8);
    out.extend_from_slice(&bytes[skip..]);
}

fn int(out: &mut Vec<u8>, i: i64) {
    let u = if i < 0 {
        ((!i as u64) << 1) | 1
    } else {
        (i as u64) << 1
    };
    uint(out, u);
}

fn string(out: &mut Vec<u8>, s: &[u8]) {
    uint(out, s.len() as u64);
    out.extend_from_slice(s);
}

fn message(out: &mut Vec<u8>, payload: &[u8]) {
    uint(out, payload.len() as u64);
    out.extend_from_slice(payload);
}

fn common(out: &mut Vec<u8>, name: &str, id: i64) {
    out.push(1);
    string(out, name.as_bytes());
    out.push(1);
    int(out, id);
    out.push(0);
}

/// A type definition message for a struct.
fn def_struct(out: &mut Vec<u8>, name: &str, id: i64, fields: &[(&str, i64)]) {
    let mut p = Vec::new();
    int(&mut p, -id);
    p.push(3); // wireType.StructT
    p.push(1); // structType.CommonType
    common(&mut p, name, id);
    p.push(1); // structType.Field
    uint(&mut p, fields.len() as u64);
    for (fname, fid) in fields {
        p.push(1);
        string(&mut p, fname.as_bytes());
        p.push(1);
        int(&mut p, *fid);
        p.push(0);
    }
    p.push(0); // end structType
    p.push(0); // end wireType
    message(out, &p);
}

fn def_map(out: &mut Vec<u8>, name: &str, id: i64, key: i64, elem: i64) {
    let mut p = Vec::new();
    int(&mut p, -id);
    p.push(4); // wireType.MapT
    p.push(1);
    common(&mut p, name, id);
    p.push(1);
    int(&mut p, key);
    p.push(1);
    int(&mut p, elem);
    p.push(0);
    p.push(0);
    message(out, &p);
}

fn def_gobencoder(out: &mut Vec<u8>, name: &str, id: i64) {
    let mut p = Vec::new();
    int(&mut p, -id);
    p.push(5); // wireType.GobEncoderT
    p.push(1);
    common(&mut p, name, id);
    p.push(0);
    p.push(0);
    message(out, &p);
}

/// An interface value: name, concrete type id, byte count, value.
fn iface(out: &mut Vec<u8>, name: &str, id: i64, value: &[u8]) {
    string(out, name.as_bytes());
    int(out, id);
    uint(out, value.len() as u64);
    out.extend_from_slice(value);
}

/// The bytes `cty.Type.GobEncode` produces (a complete gob stream).
pub fn cty_type(t: &CtyType) -> Vec<u8> {
    const GOBTYPE: i64 = 65;
    const IMPL: i64 = 66;
    const CTYTYPE: i64 = 67;
    let mut out = Vec::new();
    def_struct(
        &mut out,
        "gobType",
        GOBTYPE,
        &[("Version", T_INT), ("Impl", T_INTERFACE)],
    );
    let mut impl_val = Vec::new();
    let name = match t {
        CtyType::String | CtyType::Number | CtyType::Bool => {
            def_struct(&mut out, "primitiveType", IMPL, &[("Kind", T_UINT)]);
            let kind = match t {
                CtyType::String => b'S',
                CtyType::Number => b'N',
                _ => b'B',
            };
            impl_val.push(1);
            uint(&mut impl_val, kind as u64);
            impl_val.push(0);
            "github.com/zclconf/go-cty/cty.primitiveType"
        }
        CtyType::List(e) | CtyType::Map(e) => {
            let (sname, name) = match t {
                CtyType::List(_) => ("typeList", "github.com/zclconf/go-cty/cty.typeList"),
                _ => ("typeMap", "github.com/zclconf/go-cty/cty.typeMap"),
            };
            def_struct(&mut out, sname, IMPL, &[("ElementTypeT", CTYTYPE)]);
            def_gobencoder(&mut out, "Type", CTYTYPE);
            impl_val.push(1);
            string(&mut impl_val, &cty_type(e));
            impl_val.push(0);
            name
        }
    };
    // gobType value: Version (0) omitted, so field delta 2 for Impl.
    let mut val = Vec::new();
    int(&mut val, GOBTYPE);
    val.push(2);
    iface(&mut val, name, IMPL, &impl_val);
    val.push(0);
    message(&mut out, &val);
    out
}

const OBJ: i64 = 65;
const ATTR: i64 = 66;
const CTYT: i64 = 67;
const BLOCK: i64 = 68;
const BLOCKLIST: i64 = 69;

#[derive(Default)]
struct Need {
    attr: bool,
    block: bool,
    blocklist: bool,
}

struct SpecEncoder<'a> {
    objspec_name: &'a str,
    need: Need,
}

impl SpecEncoder<'_> {
    fn object_payload(&mut self, spec: &ObjectSpec, out: &mut Vec<u8>) {
        uint(out, spec.0.len() as u64);
        for (k, v) in &spec.0 {
            string(out, k.as_bytes());
            self.node(v, out);
        }
    }

    fn node(&mut self, node: &Spec, out: &mut Vec<u8>) {
        match node {
            Spec::Attr { name, ty, required } => {
                self.need.attr = true;
                let mut v = Vec::new();
                let mut delta = 1;
                if !name.is_empty() {
                    v.push(1);
                    string(&mut v, name.as_bytes());
                } else {
                    delta = 2;
                }
                uint(&mut v, delta);
                string(&mut v, &cty_type(ty));
                if *required {
                    v.extend_from_slice(&[1, 1]);
                }
                v.push(0);
                iface(out, "*hcldec.AttrSpec", ATTR, &v);
            }
            Spec::Block {
                type_name,
                required,
                nested,
            } => {
                self.need.block = true;
                let mut v = vec![1];
                string(&mut v, type_name.as_bytes());
                v.push(1);
                self.nested(nested, &mut v);
                if *required {
                    v.extend_from_slice(&[1, 1]);
                }
                v.push(0);
                iface(out, "*hcldec.BlockSpec", BLOCK, &v);
            }
            Spec::BlockList {
                type_name,
                min_items,
                max_items,
                nested,
            } => {
                self.need.blocklist = true;
                let mut v = vec![1];
                string(&mut v, type_name.as_bytes());
                v.push(1);
                self.nested(nested, &mut v);
                let mut delta = 1;
                if *min_items != 0 {
                    uint(&mut v, delta);
                    int(&mut v, *min_items);
                } else {
                    delta = 2;
                }
                if *max_items != 0 {
                    uint(&mut v, delta);
                    int(&mut v, *max_items);
                }
                v.push(0);
                iface(out, "*hcldec.BlockListSpec", BLOCKLIST, &v);
            }
        }
    }

    fn nested(&mut self, spec: &ObjectSpec, out: &mut Vec<u8>) {
        // a non-struct inside an interface: singleton 0, then the map
        let mut inner = vec![0];
        self.object_payload(spec, &mut inner);
        let name = self.objspec_name;
        iface(out, name, OBJ, &inner);
    }
}

/// Encodes an ObjectSpec as gob; `objspec_name` names nested ObjectSpecs
/// ([`OBJSPEC_NAME_MODULE`] or [`OBJSPEC_NAME_DEBIAN`]).
pub fn object_spec(spec: &ObjectSpec, objspec_name: &str) -> Vec<u8> {
    let mut enc = SpecEncoder {
        objspec_name,
        need: Need::default(),
    };
    let mut value = Vec::new();
    int(&mut value, OBJ);
    value.push(0);
    enc.object_payload(spec, &mut value);
    let mut out = Vec::new();
    def_map(&mut out, "ObjectSpec", OBJ, T_STRING, T_INTERFACE);
    if enc.need.attr {
        def_struct(
            &mut out,
            "AttrSpec",
            ATTR,
            &[("Name", T_STRING), ("Type", CTYT), ("Required", T_BOOL)],
        );
    }
    if enc.need.block {
        def_struct(
            &mut out,
            "BlockSpec",
            BLOCK,
            &[
                ("TypeName", T_STRING),
                ("Nested", T_INTERFACE),
                ("Required", T_BOOL),
            ],
        );
    }
    if enc.need.blocklist {
        def_struct(
            &mut out,
            "BlockListSpec",
            BLOCKLIST,
            &[
                ("TypeName", T_STRING),
                ("Nested", T_INTERFACE),
                ("MinItems", T_INT),
                ("MaxItems", T_INT),
            ],
        );
    }
    if enc.need.attr {
        def_gobencoder(&mut out, "Type", CTYT);
    }
    message(&mut out, &value);
    out
}

/// The gob stream for `CommandFinished{ExitStatus: status}`.
pub fn command_finished(status: i64) -> Vec<u8> {
    let mut out = Vec::new();
    def_struct(&mut out, "CommandFinished", 65, &[("ExitStatus", T_INT)]);
    let mut v = Vec::new();
    int(&mut v, 65);
    if status != 0 {
        v.push(1);
        int(&mut v, status);
    }
    v.push(0);
    message(&mut out, &v);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Option<Vec<(String, Vec<u8>)>> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/docs/packer-transcripts/gob/canonical-encoder-samples.txt");
        let text = std::fs::read_to_string(p).ok()?;
        let mut out = Vec::new();
        let mut lines = text.lines();
        while let Some(l) = lines.next() {
            if l.starts_with("OBJECTSPEC")
                || l.starts_with("CTY.TYPE")
                || l.starts_with("COMMANDFINISHED")
            {
                let hexline = lines.next().unwrap();
                out.push((l.to_string(), hex::decode(hexline.trim()).unwrap()));
            }
        }
        Some(out)
    }

    fn sample(all: &[(String, Vec<u8>)], title_prefix: &str) -> Vec<u8> {
        all.iter()
            .find(|(t, _)| t.starts_with(title_prefix))
            .unwrap_or_else(|| panic!("no sample {title_prefix}"))
            .1
            .clone()
    }

    #[test]
    fn command_finished_matches_go_bytes() {
        // bytes captured from Go (exit 0) and the documented values
        assert_eq!(
            hex::encode(command_finished(0)),
            "2cff810301010f436f6d6d616e6446696e697368656401ff82000101010a457869745374617475730104000000\
             03ff8200"
        );
        assert!(hex::encode(command_finished(1)).ends_with("05ff82010200"));
        assert!(hex::encode(command_finished(123)).ends_with("06ff8201fff600"));
        let Some(all) = samples() else {
            eprintln!("SKIP: gob samples not found");
            return;
        };
        for st in [0i64, 1, 2, 123, -1, 255, 256] {
            let want = sample(&all, &format!("COMMANDFINISHED ExitStatus={st} "));
            assert_eq!(command_finished(st), want, "exit {st}");
        }
    }

    #[test]
    fn cty_types_match_samples() {
        let Some(all) = samples() else {
            eprintln!("SKIP: gob samples not found");
            return;
        };
        use CtyType as C;
        let cases = [
            ("CTY.TYPE string ", C::String),
            ("CTY.TYPE number ", C::Number),
            ("CTY.TYPE bool ", C::Bool),
            ("CTY.TYPE ('list', 'string')", C::list(C::String)),
            ("CTY.TYPE ('list', 'number')", C::list(C::Number)),
            ("CTY.TYPE ('map', 'string')", C::map(C::String)),
            (
                "CTY.TYPE ('list', ('map', 'string'))",
                C::list(C::map(C::String)),
            ),
        ];
        for (title, t) in cases {
            assert_eq!(cty_type(&t), sample(&all, title), "{title}");
        }
    }

    #[test]
    fn object_specs_match_samples() {
        let Some(all) = samples() else {
            eprintln!("SKIP: gob samples not found");
            return;
        };
        use CtyType as C;
        let attr = |t| ObjectSpec::new().attr("a", t);
        let cases = [
            (
                "OBJECTSPEC attr a:String [module]",
                attr(C::String),
                OBJSPEC_NAME_MODULE,
            ),
            (
                "OBJECTSPEC attr a:Number [module]",
                attr(C::Number),
                OBJSPEC_NAME_MODULE,
            ),
            (
                "OBJECTSPEC attr a:Bool [module]",
                attr(C::Bool),
                OBJSPEC_NAME_MODULE,
            ),
            (
                "OBJECTSPEC attr a:List(String)",
                attr(C::list(C::String)),
                OBJSPEC_NAME_MODULE,
            ),
            (
                "OBJECTSPEC attr a:Map(String)",
                attr(C::map(C::String)),
                OBJSPEC_NAME_MODULE,
            ),
            (
                "OBJECTSPEC attr a:List(Map(String))",
                attr(C::list(C::map(C::String))),
                OBJSPEC_NAME_MODULE,
            ),
            (
                "OBJECTSPEC attr name:String required",
                ObjectSpec::new().required("name", C::String),
                OBJSPEC_NAME_MODULE,
            ),
            (
                "OBJECTSPEC block blk{x:String required} [module]",
                ObjectSpec::new().block("blk", ObjectSpec::new().required("x", C::String)),
                OBJSPEC_NAME_MODULE,
            ),
            (
                "OBJECTSPEC block blk{x:String required} [debian]",
                ObjectSpec::new().block("blk", ObjectSpec::new().required("x", C::String)),
                OBJSPEC_NAME_DEBIAN,
            ),
            (
                "OBJECTSPEC blocklist blks{y:Number} [module]",
                ObjectSpec::new().block_list("blks", ObjectSpec::new().attr("y", C::Number)),
                OBJSPEC_NAME_MODULE,
            ),
            (
                "OBJECTSPEC blocklist blks{y:Number} [debian]",
                ObjectSpec::new().block_list("blks", ObjectSpec::new().attr("y", C::Number)),
                OBJSPEC_NAME_DEBIAN,
            ),
            ("OBJECTSPEC empty", ObjectSpec::new(), OBJSPEC_NAME_MODULE),
        ];
        for (title, spec, name) in cases {
            assert_eq!(
                hex::encode(object_spec(&spec, name)),
                hex::encode(sample(&all, title)),
                "{title}"
            );
        }
    }

    #[test]
    fn uint_and_int_encoding() {
        let mut v = Vec::new();
        uint(&mut v, 129);
        assert_eq!(v, [0xff, 0x81]);
        v.clear();
        uint(&mut v, 0x012e);
        assert_eq!(v, [0xfe, 0x01, 0x2e]);
        v.clear();
        int(&mut v, 65);
        assert_eq!(v, [0xff, 0x82]);
        v.clear();
        int(&mut v, -65);
        assert_eq!(v, [0xff, 0x81]);
    }

    // ---- structural comparison with Go's live ConfigSpecs (decoded by gobwire) ----

    fn canon(ty: &gobwire::Type, v: &gobwire::Value) -> String {
        use gobwire::{Type as T, Value as V};
        match (ty, v) {
            (_, V::Interface(None)) => "nil".into(),
            (_, V::Interface(Some(i))) => format!("{}({})", i.name, canon(&i.ty, &i.value)),
            (T::Map(kt, vt), V::Map(entries)) => {
                let mut items: Vec<String> = entries
                    .iter()
                    .map(|(k, x)| format!("{}:{}", canon(kt, k), canon(vt, x)))
                    .collect();
                items.sort();
                format!("{{{}}}", items.join(","))
            }
            (T::Struct(st), V::Struct(fields)) => {
                let items: Vec<String> = st
                    .fields
                    .iter()
                    .zip(fields)
                    .filter_map(|((n, t), f)| f.as_ref().map(|f| format!("{n}={}", canon(t, f))))
                    .collect();
                format!("{}{{{}}}", st.name, items.join(","))
            }
            (_, V::Marshaled(b)) | (T::Marshaler(..), V::Bytes(b)) => {
                let d: gobwire::Dynamic = gobwire::StreamDecoder::new(&b[..])
                    .decode()
                    .expect("nested gob stream")
                    .expect("nested value");
                format!("<{}>", canon(&d.ty, &d.value))
            }
            (_, V::String(s)) => format!("{s:?}"),
            (_, other) => format!("{other:?}"),
        }
    }

    fn decode_canon(bytes: &[u8]) -> String {
        let d: gobwire::Dynamic = gobwire::StreamDecoder::new(bytes)
            .decode()
            .expect("gob stream decodes")
            .expect("one value");
        canon(&d.ty, &d.value)
    }

    #[test]
    fn live_configspecs_decode_like_ours() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/docs/packer-transcripts/gob");
        if !dir.exists() {
            eprintln!("SKIP: gob captures not found");
            return;
        }
        for name in ["file-builder", "null-builder", "amazon-ebs-nested"] {
            let hexs = std::fs::read_to_string(dir.join(format!("live-configspec-{name}.gob.hex")))
                .unwrap();
            let live = hex::decode(hexs.split_whitespace().collect::<String>()).unwrap();
            let text = std::fs::read_to_string(
                dir.join(format!("live-configspec-{name}.decoded-by-go.txt")),
            )
            .unwrap();
            let spec = crate::packer::spec::parse_gobdump_text(&text);
            assert!(
                spec.0.len() > 5,
                "{name}: parsed only {} entries",
                spec.0.len()
            );
            let ours = object_spec(&spec, OBJSPEC_NAME_DEBIAN);
            assert_eq!(decode_canon(&ours), decode_canon(&live), "{name}");
            if name == "amazon-ebs-nested" {
                // the comparison is sharp: the module name differs from Debian's
                let module = object_spec(&spec, OBJSPEC_NAME_MODULE);
                assert_ne!(decode_canon(&module), decode_canon(&live));
                assert!(decode_canon(&live).contains(OBJSPEC_NAME_DEBIAN));
            }
        }
    }
}
