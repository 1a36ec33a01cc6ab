//! The protobuf form of the ConfigSpec (`Spec{object}` from the SDK's
//! `rpc/hcl_spec.proto`), used when Packer ≥ 1.12 starts us with `--protobuf`.
//! Hand-written: nine tiny messages do not justify a code generator.

use super::spec::{CtyType, ObjectSpec, Spec};

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field.
fn ld(out: &mut Vec<u8>, field: u32, payload: &[u8]) {
    varint(out, ((field as u64) << 3) | 2);
    varint(out, payload.len() as u64);
    out.extend_from_slice(payload);
}

fn cty(t: &CtyType) -> Vec<u8> {
    let mut out = Vec::new();
    match t {
        CtyType::String | CtyType::Number | CtyType::Bool => {
            let mut prim = Vec::new();
            ld(&mut prim, 1, t.go_string().as_bytes());
            ld(&mut out, 1, &prim);
        }
        CtyType::List(e) => {
            let mut l = Vec::new();
            ld(&mut l, 1, &cty(e));
            ld(&mut out, 2, &l);
        }
        CtyType::Map(e) => {
            let mut m = Vec::new();
            ld(&mut m, 1, &cty(e));
            ld(&mut out, 3, &m);
        }
    }
    out
}

/// Encodes one `Spec` message.
fn spec(node: &Spec) -> Vec<u8> {
    let mut out = Vec::new();
    match node {
        Spec::Attr { name, ty, required } => {
            let mut a = Vec::new();
            if !name.is_empty() {
                ld(&mut a, 1, name.as_bytes());
            }
            ld(&mut a, 2, &cty(ty));
            if *required {
                a.extend_from_slice(&[0x18, 0x01]);
            }
            ld(&mut out, 2, &a);
        }
        Spec::Block {
            type_name,
            required,
            nested,
        } => {
            let mut b = Vec::new();
            ld(&mut b, 1, type_name.as_bytes());
            if *required {
                b.extend_from_slice(&[0x10, 0x01]);
            }
            ld(&mut b, 3, &object(nested));
            ld(&mut out, 3, &b);
        }
        Spec::BlockList {
            type_name, nested, ..
        } => {
            let mut b = Vec::new();
            ld(&mut b, 1, type_name.as_bytes());
            ld(&mut b, 2, &object(nested));
            ld(&mut out, 4, &b);
        }
    }
    out
}

/// `Spec{object: Object{attributes}}`; map entries sorted by key.
pub fn object(o: &ObjectSpec) -> Vec<u8> {
    let mut obj = Vec::new();
    for (k, v) in &o.0 {
        let mut entry = Vec::new();
        ld(&mut entry, 1, k.as_bytes());
        ld(&mut entry, 2, &spec(v));
        ld(&mut obj, 1, &entry);
    }
    let mut out = Vec::new();
    ld(&mut out, 1, &obj);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_sdk_samples() {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/docs/packer-transcripts/protobuf/configspec-protobuf-samples.txt");
        let Ok(text) = std::fs::read_to_string(p) else {
            eprintln!("SKIP: protobuf samples not found");
            return;
        };
        let mut samples = Vec::new();
        let mut lines = text.lines();
        while let Some(l) = lines.next() {
            if l.starts_with("PROTO OBJECTSPEC") {
                samples.push((l.to_string(), lines.next().unwrap().trim().to_string()));
            }
        }
        use CtyType as C;
        let attr = |t| ObjectSpec::new().attr("a", t);
        let nested_x = ObjectSpec::new().attr("x", C::String);
        let expected = [
            attr(C::String),
            attr(C::Number),
            attr(C::Bool),
            attr(C::list(C::String)),
            attr(C::list(C::Number)),
            attr(C::map(C::String)),
            attr(C::list(C::map(C::String))),
            ObjectSpec::new().required("name", C::String),
            ObjectSpec::new().block("blk", nested_x.clone()),
            ObjectSpec::new().block_list("blks", nested_x),
            ObjectSpec::new().attr("a", C::String).attr("b", C::Number),
            ObjectSpec::new(),
        ];
        assert_eq!(samples.len(), expected.len());
        for ((title, want), spec) in samples.iter().zip(expected.iter()) {
            assert_eq!(&hex::encode(object(spec)), want, "{title}");
        }
    }
}
