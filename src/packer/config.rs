//! What `Builder.Prepare` receives, turned into one JSON map of options.
//!
//! HCL2 templates send `[map[string]string, bin(cty JSON)]`; JSON templates
//! send `[builder object (uninterpolated), packer config map]`. The raws are
//! overlaid in order (nulls skipped), JSON-template strings are interpolated,
//! and values are checked and coerced against the ConfigSpec so that errors
//! name the option.

use std::collections::BTreeMap;

use rmpv::Value as Mp;
use serde_json::{Map, Value};

use super::interp::{self, InterpContext};
use super::spec::{CtyType, ObjectSpec, Spec};

/// The `packer_*` values Packer passes to every builder.
#[derive(Debug, Clone, Default)]
pub struct PackerVars {
    pub build_name: String,
    pub builder_type: String,
    pub core_version: String,
    pub debug: bool,
    pub force: bool,
    pub on_error: String,
    pub template_path: String,
    pub user_variables: BTreeMap<String, String>,
}

/// The builder's options after merging, interpolation and type checks.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Options by name (without the `packer_*` keys); unset options are absent.
    pub values: Map<String, Value>,
    pub packer: PackerVars,
    /// True for a JSON template (options were interpolated by us).
    pub json_template: bool,
}

impl Config {
    /// Deserializes the options into `T`; the error names the field.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_value(Value::Object(self.values.clone())).map_err(|e| e.to_string())
    }
    pub fn get_str(&self, k: &str) -> Option<&str> {
        self.values.get(k).and_then(|v| v.as_str())
    }
}

/// Converts a msgpack value to JSON. Integral floats become integers (JSON
/// templates send every number as float64); bin becomes a string.
pub fn mp_to_json(v: &Mp) -> Value {
    match v {
        Mp::Nil => Value::Null,
        Mp::Boolean(b) => Value::Bool(*b),
        Mp::Integer(i) => {
            if let Some(u) = i.as_u64() {
                Value::from(u)
            } else {
                Value::from(i.as_i64().unwrap_or(0))
            }
        }
        Mp::F32(f) => float_json(*f as f64),
        Mp::F64(f) => float_json(*f),
        Mp::String(s) => Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        Mp::Binary(b) => Value::String(String::from_utf8_lossy(b).into_owned()),
        Mp::Array(a) => Value::Array(a.iter().map(mp_to_json).collect()),
        Mp::Map(m) => {
            let mut out = Map::new();
            for (k, v) in m {
                let key = match k {
                    Mp::String(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                    Mp::Binary(b) => String::from_utf8_lossy(b).into_owned(),
                    other => other.to_string(),
                };
                out.insert(key, mp_to_json(v));
            }
            Value::Object(out)
        }
        Mp::Ext(_, _) => Value::Null,
    }
}

fn float_json(f: f64) -> Value {
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        Value::from(f as i64)
    } else {
        serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null)
    }
}

/// JSON to msgpack (str keys, strings as str).
pub fn json_to_mp(v: &Value) -> Mp {
    match v {
        Value::Null => Mp::Nil,
        Value::Bool(b) => Mp::Boolean(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Mp::from(i)
            } else if let Some(u) = n.as_u64() {
                Mp::from(u)
            } else {
                Mp::F64(n.as_f64().unwrap_or(0.0))
            }
        }
        Value::String(s) => Mp::from(s.as_str()),
        Value::Array(a) => Mp::Array(a.iter().map(json_to_mp).collect()),
        Value::Object(o) => Mp::Map(
            o.iter()
                .map(|(k, v)| (Mp::from(k.as_str()), json_to_mp(v)))
                .collect(),
        ),
    }
}

fn as_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) => match s.as_str() {
            "true" | "1" => Some(true),
            "false" | "0" | "" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

fn describe(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!("{}…", &s[..60])
    } else {
        s
    }
}

/// Coerces `v` to `ty` the way mapstructure's weak decoding does.
fn coerce(path: &str, ty: &CtyType, v: Value, errs: &mut Vec<String>) -> Option<Value> {
    let bad = |want: &str, errs: &mut Vec<String>, v: &Value| {
        errs.push(format!("{path}: expected {want}, got {}", describe(v)));
        None
    };
    match ty {
        CtyType::String => match v {
            Value::String(_) => Some(v),
            Value::Number(n) => Some(Value::String(n.to_string())),
            Value::Bool(b) => Some(Value::String(b.to_string())),
            other => bad("a string", errs, &other),
        },
        CtyType::Number => match v {
            Value::Number(_) => Some(v),
            Value::String(ref s) => match s.trim().parse::<f64>() {
                Ok(f) => Some(float_json(f)),
                Err(_) => bad("a number", errs, &v),
            },
            other => bad("a number", errs, &other),
        },
        CtyType::Bool => match as_bool(&v) {
            Some(b) => Some(Value::Bool(b)),
            None => bad("a bool", errs, &v),
        },
        CtyType::List(e) => match v {
            Value::Array(a) => {
                let mut out = Vec::new();
                for (i, x) in a.into_iter().enumerate() {
                    if let Some(x) = coerce(&format!("{path}[{i}]"), e, x, errs) {
                        out.push(x);
                    }
                }
                Some(Value::Array(out))
            }
            other => bad("a list", errs, &other),
        },
        CtyType::Map(e) => match v {
            Value::Object(o) => {
                let mut out = Map::new();
                for (k, x) in o {
                    if let Some(x) = coerce(&format!("{path}.{k}"), e, x, errs) {
                        out.insert(k, x);
                    }
                }
                Some(Value::Object(out))
            }
            other => bad("a map", errs, &other),
        },
    }
}

/// Checks an object against a spec: unknown keys and wrong types are errors.
pub fn check_object(
    prefix: &str,
    spec: &ObjectSpec,
    obj: Map<String, Value>,
    errs: &mut Vec<String>,
) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, v) in obj {
        if v.is_null() {
            continue;
        }
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        let Some(s) = spec.get(&k) else {
            errs.push(format!("unknown configuration key: {path:?}"));
            continue;
        };
        let v = match s {
            Spec::Attr { ty, .. } => coerce(&path, ty, v, errs),
            Spec::Block { nested, .. } => match v {
                Value::Object(o) => Some(Value::Object(check_object(&path, nested, o, errs))),
                // JSON templates may write a one-element list for a block
                Value::Array(mut a) if a.len() == 1 && a[0].is_object() => {
                    let Value::Object(o) = a.remove(0) else {
                        unreachable!()
                    };
                    Some(Value::Object(check_object(&path, nested, o, errs)))
                }
                other => {
                    errs.push(format!(
                        "{path}: expected a block, got {}",
                        describe(&other)
                    ));
                    None
                }
            },
            Spec::BlockList { nested, .. } => {
                let items = match v {
                    Value::Array(a) => a,
                    o @ Value::Object(_) => vec![o],
                    other => {
                        errs.push(format!(
                            "{path}: expected a list of blocks, got {}",
                            describe(&other)
                        ));
                        continue;
                    }
                };
                let mut out_items = Vec::new();
                for (i, it) in items.into_iter().enumerate() {
                    match it {
                        Value::Object(o) => out_items.push(Value::Object(check_object(
                            &format!("{path}[{i}]"),
                            nested,
                            o,
                            errs,
                        ))),
                        other => errs.push(format!(
                            "{path}[{i}]: expected a block, got {}",
                            describe(&other)
                        )),
                    }
                }
                Some(Value::Array(out_items))
            }
        };
        if let Some(v) = v {
            out.insert(k, v);
        }
    }
    out
}

fn interpolate(path: &str, v: Value, ctx: &InterpContext, errs: &mut Vec<String>) -> Value {
    match v {
        Value::String(s) if s.contains("{{") => match interp::render(&s, ctx) {
            Ok(r) => Value::String(r),
            Err(e) => {
                errs.push(format!("{path}: {e}"));
                Value::String(s)
            }
        },
        Value::Array(a) => Value::Array(
            a.into_iter()
                .enumerate()
                .map(|(i, x)| interpolate(&format!("{path}[{i}]"), x, ctx, errs))
                .collect(),
        ),
        Value::Object(o) => Value::Object(
            o.into_iter()
                .map(|(k, x)| {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    let x = interpolate(&p, x, ctx, errs);
                    (k, x)
                })
                .collect(),
        ),
        other => other,
    }
}

fn take_packer_vars(m: &mut Map<String, Value>) -> PackerVars {
    let mut p = PackerVars::default();
    let s = |v: Option<Value>| {
        v.and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    };
    p.build_name = s(m.remove("packer_build_name"));
    p.builder_type = s(m.remove("packer_builder_type"));
    p.core_version = s(m.remove("packer_core_version"));
    p.on_error = s(m.remove("packer_on_error"));
    p.template_path = s(m.remove("packer_template_path"));
    p.debug = m
        .remove("packer_debug")
        .as_ref()
        .and_then(as_bool)
        .unwrap_or(false);
    p.force = m
        .remove("packer_force")
        .as_ref()
        .and_then(as_bool)
        .unwrap_or(false);
    if let Some(Value::Object(o)) = m.remove("packer_user_variables") {
        for (k, v) in o {
            if let Value::String(s) = v {
                p.user_variables.insert(k, s);
            }
        }
    }
    m.remove("packer_sensitive_variables");
    p
}

/// Builds the [`Config`] from `Builder.Prepare`'s `Configs` raws.
pub fn from_raws(raws: &[Mp], spec: &ObjectSpec) -> Result<Config, Vec<String>> {
    let mut merged = Map::new();
    // HCL2 sends its options as cty JSON (bin); JSON templates only maps.
    let json_template = !raws.iter().any(|r| matches!(r, Mp::Binary(_)));
    let mut errs = Vec::new();
    for raw in raws {
        match raw {
            Mp::Binary(b) => {
                // HCL2: cty JSON {"value": …, "type": …}
                match serde_json::from_slice::<Value>(b) {
                    Ok(Value::Object(mut o)) => {
                        if let Some(Value::Object(val)) = o.remove("value") {
                            for (k, v) in val {
                                if !v.is_null() {
                                    merged.insert(k, v);
                                }
                            }
                        }
                    }
                    Ok(_) => errs.push("Prepare: cty JSON raw is not an object".into()),
                    Err(e) => errs.push(format!("Prepare: decoding a cty JSON raw: {e}")),
                }
            }
            Mp::Map(_) => {
                if let Value::Object(o) = mp_to_json(raw) {
                    for (k, v) in o {
                        if !v.is_null() {
                            merged.insert(k, v);
                        }
                    }
                }
            }
            Mp::Nil => {}
            other => errs.push(format!("Prepare: unexpected raw config {other}")),
        }
    }
    let packer = take_packer_vars(&mut merged);
    merged.remove("");
    if json_template {
        let ctx = InterpContext {
            user_variables: packer.user_variables.clone(),
            build_name: packer.build_name.clone(),
            build_type: packer.builder_type.clone(),
            template_path: packer.template_path.clone(),
            core_version: packer.core_version.clone(),
            init_time: InterpContext::now(),
            enable_env: false,
        };
        if let Value::Object(o) = interpolate("", Value::Object(merged), &ctx, &mut errs) {
            merged = o;
        } else {
            unreachable!()
        }
    }
    let values = check_object("", spec, merged, &mut errs);
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(Config {
        values,
        packer,
        json_template,
    })
}

/// Go's multierror text: "1 error occurred:\n\t* …\n\n".
pub fn multierror(errs: &[String]) -> String {
    let mut s = if errs.len() == 1 {
        "1 error occurred:\n".to_string()
    } else {
        format!("{} errors occurred:\n", errs.len())
    };
    for e in errs {
        s.push_str("\t* ");
        s.push_str(e);
        s.push('\n');
    }
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec() -> ObjectSpec {
        ObjectSpec::new()
            .attr("message", CtyType::String)
            .attr("count", CtyType::Number)
            .attr("flag", CtyType::Bool)
            .attr("tags", CtyType::list(CtyType::String))
            .attr("labels", CtyType::map(CtyType::String))
            .block("extra", ObjectSpec::new().attr("note", CtyType::String))
            .with_packer_common()
    }

    fn body_configs(hexbody: &str) -> Vec<Mp> {
        let b = hex::decode(hexbody).unwrap();
        let v = rmpv::decode::read_value(&mut &b[..]).unwrap();
        match crate::packer::rpc::field(&v, "Configs") {
            Some(Mp::Array(a)) => a.clone(),
            _ => panic!("no Configs"),
        }
    }

    fn capture_prepare(case: &str) -> Option<Vec<Mp>> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/docs/packer-transcripts/captures")
            .join(case)
            .join("transcript.jsonl");
        let text = std::fs::read_to_string(p).ok()?;
        for line in text.lines() {
            let j: Value = serde_json::from_str(line).unwrap();
            if j.get("method").and_then(|m| m.as_str()) == Some("Builder.Prepare")
                && j.get("body_hex").is_some()
                && j.get("text")
                    .and_then(|t| t.as_str())
                    .is_some_and(|t| t.contains("REQUEST"))
            {
                return Some(body_configs(j["body_hex"].as_str().unwrap()));
            }
        }
        None
    }

    #[test]
    fn json_template_capture_is_interpolated() {
        let Some(raws) = capture_prepare("14-json-interpolation") else {
            eprintln!("SKIP: capture 14 not found");
            return;
        };
        // The null builder's options are not ours: accept every key as string.
        let mut sp = ObjectSpec::new().with_packer_common();
        if let Value::Object(o) = mp_to_json(&raws[0]) {
            for k in o.keys() {
                sp = sp.attr(k, CtyType::String);
            }
        }
        let cfg = from_raws(&raws, &sp).unwrap();
        assert!(cfg.json_template);
        let interpolated: Vec<&Value> = cfg
            .values
            .values()
            .filter(|v| v.as_str().is_some_and(|s| s.contains("hello-")))
            .collect();
        assert!(!interpolated.is_empty(), "{:?}", cfg.values);
        assert!(!cfg
            .values
            .values()
            .any(|v| v.as_str().is_some_and(|s| s.contains("{{"))));
        assert_eq!(cfg.packer.core_version, "1.6.6");
    }

    #[test]
    fn hcl_capture_merges_cty_json() {
        let Some(raws) = capture_prepare("10-hcl-file-builder-build") else {
            eprintln!("SKIP: capture 10 not found");
            return;
        };
        let sp = ObjectSpec::new()
            .attr("content", CtyType::String)
            .attr("source", CtyType::String)
            .attr("target", CtyType::String)
            .with_packer_common();
        let cfg = from_raws(&raws, &sp).unwrap();
        assert!(!cfg.json_template);
        assert_eq!(cfg.get_str("target"), Some("hcl-file-out.txt"));
        assert!(!cfg.values.contains_key("source"));
        assert!(!cfg.packer.build_name.is_empty());
    }

    #[test]
    fn hcl_nested_blocks_from_capture() {
        let Some(raws) = capture_prepare("12-hcl-amazon-ebs-nested-configspec") else {
            eprintln!("SKIP: capture 12 not found");
            return;
        };
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(
            "../shared/docs/packer-transcripts/gob/live-configspec-amazon-ebs-nested.decoded-by-go.txt",
        );
        let spec = crate::packer::spec::parse_gobdump_text(&std::fs::read_to_string(p).unwrap());
        let cfg = from_raws(&raws, &spec).unwrap();
        // a present block list, an absent one ([]), a single block, and an absent one (null)
        assert_eq!(
            cfg.values["launch_block_device_mappings"],
            json!([{"device_name": "/dev/sda1", "volume_size": 8}])
        );
        assert_eq!(cfg.values["ami_block_device_mappings"], json!([]));
        assert_eq!(
            cfg.values["source_ami_filter"]["filters"],
            json!({"name": "debian-*"})
        );
        assert_eq!(cfg.values["source_ami_filter"]["owners"], json!(["self"]));
        assert!(!cfg.values.contains_key("assume_role"));
        assert_eq!(cfg.get_str("ami_name"), Some("x"));
        assert_eq!(cfg.packer.build_name, "n");
        assert!(!cfg.packer.debug);
    }

    #[test]
    fn coercion_and_errors_name_the_option() {
        let raws = vec![
            json_to_mp(
                &json!({"message": "{{user `a`}}", "count": 2.0, "flag": "true",
                               "tags": ["x", 1.0], "labels": {"k": "v"}, "extra": {"note": "n"}}),
            ),
            json_to_mp(
                &json!({"packer_build_name": "b", "packer_builder_type": "t",
                               "packer_template_path": "/x/t.json", "packer_debug": false,
                               "packer_user_variables": {"a": "A", "": ""}}),
            ),
        ];
        let cfg = from_raws(&raws, &spec()).unwrap();
        assert_eq!(
            Value::Object(cfg.values.clone()),
            json!({"message": "A", "count": 2, "flag": true, "tags": ["x", "1"],
                   "labels": {"k": "v"}, "extra": {"note": "n"}})
        );
        let bad = vec![json_to_mp(
            &json!({"count": "many", "bogus": 1, "extra": {"zz": 1}}),
        )];
        let errs = from_raws(&bad, &spec()).unwrap_err();
        let text = multierror(&errs);
        assert!(text.starts_with("3 errors occurred:\n"), "{text}");
        assert!(text.contains("count: expected a number, got \"many\""));
        assert!(text.contains("unknown configuration key: \"bogus\""));
        assert!(text.contains("unknown configuration key: \"extra.zz\""));
    }
}
