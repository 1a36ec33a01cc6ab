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
