//! The `.ci.yaml` v1 document exactly as written, with source positions.
//!
//! These types only describe the shape; [`super::lower`] checks meaning and expands matrices.
//! Every value a later check might complain about is [`Spanned`], so the complaint can point at
//! it. Scalars that mean numbers to us (timeouts, quantities) are read as text and parsed in
//! `lower`, which keeps their spelling for error messages.

use std::fmt;

use indexmap::IndexMap;
use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_saphyr::Spanned;

pub(crate) type S<T> = Spanned<T>;
pub(crate) type SMap = IndexMap<S<String>, S<String>>;
/// One matrix axis: its name and its values.
pub(crate) type Axis = (S<String>, S<Vec<S<String>>>);

/// `Some(value)` whenever the key is present, even as `key:` with no value, so `push:` alone
/// can mean "every branch" while a missing `push` means "not on pushes".
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPipeline {
    pub version: S<u32>,
    #[serde(default)]
    pub on: Option<S<RawOn>>,
    #[serde(default)]
    pub concurrency: Option<S<RawConcurrency>>,
    #[serde(default)]
    pub env: Option<S<SMap>>,
    #[serde(default)]
    pub defaults: Option<S<RawDefaults>>,
    pub jobs: S<IndexMap<S<String>, S<RawJob>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOn {
    #[serde(default, deserialize_with = "present")]
    pub push: Option<S<Option<RawBranchFilter>>>,
    #[serde(default, deserialize_with = "present")]
    pub pull_request: Option<S<Option<RawBranchFilter>>>,
    #[serde(default)]
    pub tag: Option<S<Vec<S<String>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBranchFilter {
    #[serde(default)]
    pub branches: Option<Vec<S<String>>>,
    #[serde(default)]
    pub branches_ignore: Option<Vec<S<String>>>,
    #[serde(default)]
    pub paths: Option<Vec<S<String>>>,
    #[serde(default)]
    pub paths_ignore: Option<Vec<S<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConcurrency {
    pub group: S<String>,
    #[serde(default)]
    pub cancel_in_progress: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDefaults {
    #[serde(default)]
    pub image: Option<S<String>>,
    #[serde(default)]
    pub timeout: Option<S<String>>,
    #[serde(default)]
    pub resources: Option<S<RawResources>>,
    #[serde(default)]
    pub retry: Option<S<RawRetry>>,
    #[serde(default)]
    pub placement: Option<S<RawPlacement>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawJob {
    #[serde(default)]
    pub image: Option<S<String>>,
    #[serde(default)]
    pub run: Option<S<String>>,
    #[serde(default)]
    pub steps: Option<S<Vec<S<RawStep>>>>,
    #[serde(default)]
    pub needs: Option<S<Vec<S<String>>>>,
    #[serde(default)]
    pub matrix: Option<S<RawMatrix>>,
    #[serde(default)]
    pub timeout: Option<S<String>>,
    #[serde(default)]
    pub resources: Option<S<RawResources>>,
    #[serde(default)]
    pub env: Option<S<SMap>>,
    #[serde(default)]
    pub cache: Option<S<RawCache>>,
    #[serde(default)]
    pub artifacts: Option<S<RawArtifacts>>,
    #[serde(default)]
    pub secrets: Option<S<Vec<S<String>>>>,
    #[serde(default)]
    pub retry: Option<S<RawRetry>>,
    #[serde(default)]
    pub placement: Option<S<RawPlacement>>,
    #[serde(default, rename = "if")]
    pub condition: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStep {
    #[serde(default)]
    pub name: Option<S<String>>,
    pub run: S<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawResources {
    #[serde(default)]
    pub cpu: Option<S<String>>,
    #[serde(default)]
    pub memory: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCache {
    pub key: S<String>,
    pub paths: S<Vec<S<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawArtifacts {
    pub paths: S<Vec<S<String>>>,
    #[serde(default)]
    pub expire_in: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRetry {
    #[serde(default)]
    pub infra: Option<S<u32>>,
    #[serde(default)]
    pub test: Option<S<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPlacement {
    #[serde(default)]
    pub region: Option<S<String>>,
    #[serde(default)]
    pub labels: Option<S<SMap>>,
    #[serde(default)]
    pub pool: Option<S<String>>,
}

/// `matrix:` — axes (`name: [values]`) plus the reserved keys `include` and `exclude`, which
/// hold lists of `{axis: value}` mappings. Values are read as text, so `1.80` stays `1.80`
/// rather than becoming the number 1.8.
#[derive(Debug, Default)]
pub(crate) struct RawMatrix {
    pub axes: Vec<Axis>,
    pub include: Vec<S<SMap>>,
    pub exclude: Vec<S<SMap>>,
}

impl<'de> Deserialize<'de> for RawMatrix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MatrixVisitor;

        impl<'de> Visitor<'de> for MatrixVisitor {
            type Value = RawMatrix;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping of axis names to lists of values")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawMatrix, A::Error> {
                let mut m = RawMatrix::default();
                while let Some(key) = map.next_key::<S<String>>()? {
                    match key.value.as_str() {
                        "include" => m.include = map.next_value()?,
                        "exclude" => m.exclude = map.next_value()?,
                        _ => {
                            let values = map.next_value()?;
                            m.axes.push((key, values));
                        }
                    }
                }
                Ok(m)
            }
        }

        d.deserialize_map(MatrixVisitor)
    }
}
