//! The builder's configuration schema (an `hcldec.ObjectSpec` in Packer's
//! terms) and its two wire encodings: gob (Packer 1.6.6 … 1.11, and later
//! without `--protobuf`) and protobuf (`--protobuf`, Packer ≥ 1.12).

use std::collections::BTreeMap;

/// The cty types a ConfigSpec attribute may have (both encodings can carry them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CtyType {
    String,
    Number,
    Bool,
    List(Box<CtyType>),
    Map(Box<CtyType>),
}

impl CtyType {
    pub fn list(t: CtyType) -> CtyType {
        CtyType::List(Box::new(t))
    }
    pub fn map(t: CtyType) -> CtyType {
        CtyType::Map(Box::new(t))
    }
    /// Go's `GoString()` spelling, used in error messages.
    pub fn go_string(&self) -> String {
        match self {
            CtyType::String => "cty.String".into(),
            CtyType::Number => "cty.Number".into(),
            CtyType::Bool => "cty.Bool".into(),
            CtyType::List(t) => format!("cty.List({})", t.go_string()),
            CtyType::Map(t) => format!("cty.Map({})", t.go_string()),
        }
    }
}

/// One entry of an object spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    Attr {
        name: String,
        ty: CtyType,
        required: bool,
    },
    /// A single nested block (`name { … }`); absent gives `null`.
    Block {
        type_name: String,
        required: bool,
        nested: ObjectSpec,
    },
    /// Repeated nested blocks; absent gives `[]`.
    BlockList {
        type_name: String,
        min_items: i64,
        max_items: i64,
        nested: ObjectSpec,
    },
}

/// `map[string]hcldec.Spec`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectSpec(pub BTreeMap<String, Spec>);

/// The spec a builder returns from [`crate::packer::Builder::config_spec`].
pub type ConfigSpec = ObjectSpec;

/// The generic attributes every SDK builder accepts.
pub fn packer_common_attrs() -> Vec<(&'static str, CtyType)> {
    vec![
        ("packer_build_name", CtyType::String),
        ("packer_builder_type", CtyType::String),
        ("packer_core_version", CtyType::String),
        ("packer_debug", CtyType::Bool),
        ("packer_force", CtyType::Bool),
        ("packer_on_error", CtyType::String),
        ("packer_user_variables", CtyType::map(CtyType::String)),
        ("packer_sensitive_variables", CtyType::list(CtyType::String)),
    ]
}

impl ObjectSpec {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an optional attribute.
    pub fn attr(mut self, name: &str, ty: CtyType) -> Self {
        self.0.insert(
            name.into(),
            Spec::Attr {
                name: name.into(),
                ty,
                required: false,
            },
        );
        self
    }

    /// Adds a required attribute.
    pub fn required(mut self, name: &str, ty: CtyType) -> Self {
        self.0.insert(
            name.into(),
            Spec::Attr {
                name: name.into(),
                ty,
                required: true,
            },
        );
        self
    }

    /// Adds an optional single nested block.
    pub fn block(mut self, name: &str, nested: ObjectSpec) -> Self {
        self.0.insert(
            name.into(),
            Spec::Block {
                type_name: name.into(),
                required: false,
                nested,
            },
        );
        self
    }

    /// Adds a repeatable nested block.
    pub fn block_list(mut self, name: &str, nested: ObjectSpec) -> Self {
        self.0.insert(
            name.into(),
            Spec::BlockList {
                type_name: name.into(),
                min_items: 0,
                max_items: 0,
                nested,
            },
        );
        self
    }

    /// The spec plus the `packer_*` attributes (unless already present).
    pub fn with_packer_common(mut self) -> Self {
        for (k, t) in packer_common_attrs() {
            if !self.0.contains_key(k) {
                self = self.attr(k, t);
            }
        }
        self
    }

    /// The entry for an option key, if the spec knows it.
    pub fn get(&self, key: &str) -> Option<&Spec> {
        self.0.get(key)
    }
}

/// Parses the text `tools/gobdump.go` prints for an ObjectSpec (test vectors).
#[cfg(test)]
pub(crate) fn parse_gobdump_text(text: &str) -> ObjectSpec {
    parse_go_text(&mut text.lines().peekable())
}

#[cfg(test)]
fn parse_cty(s: &str) -> CtyType {
    match s {
        "cty.String" => CtyType::String,
        "cty.Number" => CtyType::Number,
        "cty.Bool" => CtyType::Bool,
        _ if s.starts_with("cty.List(") => CtyType::list(parse_cty(&s[9..s.len() - 1])),
        _ if s.starts_with("cty.Map(") => CtyType::map(parse_cty(&s[8..s.len() - 1])),
        other => panic!("cty type {other}"),
    }
}

#[cfg(test)]
fn attr_of(line: &str, key: &str) -> String {
    let i = line.find(&format!("{key}:")).unwrap() + key.len() + 1;
    let rest = &line[i..];
    if let Some(r) = rest.strip_prefix('"') {
        r[..r.find('"').unwrap()].to_string()
    } else {
        rest.split([' ', '}']).next().unwrap().to_string()
    }
}

#[cfg(test)]
/// Parses gobdump's text form of an ObjectSpec (one entry per line).
pub(crate) fn parse_go_text(lines: &mut std::iter::Peekable<std::str::Lines<'_>>) -> ObjectSpec {
    let mut spec = ObjectSpec::new();
    while let Some(line) = lines.next() {
        let t = line.trim();
        if t == "}" || t == "}}" || t == "{" {
            if t == "{" {
                continue;
            }
            break;
        }
        let key = t[1..t[1..].find('"').unwrap() + 1].to_string();
        let required = t.contains("Required:true");
        if t.contains("AttrSpec{") {
            let ty = parse_cty(&attr_of(t, "Type"));
            let name = attr_of(t, "Name");
            spec.0.insert(key, Spec::Attr { name, ty, required });
        } else if t.contains("BlockListSpec{") {
            let type_name = attr_of(t, "TypeName");
            let min_items = attr_of(t, "MinItems").parse().unwrap();
            let max_items = attr_of(t, "MaxItems").parse().unwrap();
            let nested = parse_go_text(lines);
            spec.0.insert(
                key,
                Spec::BlockList {
                    type_name,
                    min_items,
                    max_items,
                    nested,
                },
            );
        } else if t.contains("BlockSpec{") {
            let type_name = attr_of(t, "TypeName");
            let nested = parse_go_text(lines);
            spec.0.insert(
                key,
                Spec::Block {
                    type_name,
                    required,
                    nested,
                },
            );
        } else {
            panic!("unexpected line {t}");
        }
    }
    spec
}
