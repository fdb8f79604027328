//! The file layer of the config: serde structs that mirror the YAML exactly.
//!
//! Every struct refuses unknown fields, and every value that validation may complain about is
//! wrapped in [`Spanned`] so that the complaint can name its line and column. Nothing here is
//! checked beyond its YAML type; `config::validate` turns these into real types.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

/// A spanned value: the value and where it was written.
pub type S<T> = Spanned<T>;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub admin: Option<FileAdmin>,
    #[serde(default)]
    pub access_log: Option<S<String>>,
    #[serde(default)]
    pub workers: Option<S<u32>>,
    #[serde(default)]
    pub shutdown_grace: Option<S<String>>,
    #[serde(default)]
    pub listeners: Vec<FileListener>,
    #[serde(default)]
    pub clusters: BTreeMap<String, FileCluster>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAdmin {
    #[serde(default)]
    pub address: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileListener {
    #[serde(default)]
    pub name: Option<S<String>>,
    pub address: S<String>,
    #[serde(default)]
    pub protocol: Option<S<String>>,
    /// For `protocol: tcp`: the cluster that receives the bytes.
    #[serde(default)]
    pub cluster: Option<S<String>>,
    #[serde(default)]
    pub routes: Option<S<Vec<S<FileRoute>>>>,
    #[serde(default)]
    pub max_connections: Option<S<u64>>,
    #[serde(default)]
    pub header_read_timeout: Option<S<String>>,
    #[serde(default)]
    pub max_header_bytes: Option<S<u64>>,
    #[serde(default)]
    pub forwarded: Option<FileForwarded>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileForwarded {
    #[serde(default)]
    pub x_forwarded_for: Option<bool>,
    #[serde(default)]
    pub x_forwarded_proto: Option<bool>,
    #[serde(default)]
    pub via: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRoute {
    #[serde(default)]
    pub name: Option<S<String>>,
    #[serde(default, rename = "match")]
    pub matcher: Option<FileMatch>,
    #[serde(default)]
    pub cluster: Option<S<String>>,
    #[serde(default)]
    pub rewrite: Option<FileRewrite>,
    #[serde(default)]
    pub request_headers: Option<FileHeaderOps>,
    #[serde(default)]
    pub response_headers: Option<FileHeaderOps>,
    #[serde(default)]
    pub timeout: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileMatch {
    #[serde(default)]
    pub host: Option<S<String>>,
    #[serde(default)]
    pub path: Option<S<FilePathMatch>>,
    #[serde(default)]
    pub methods: Option<Vec<S<String>>>,
    #[serde(default)]
    pub headers: Option<Vec<FileValueMatch>>,
    #[serde(default)]
    pub query: Option<Vec<FileValueMatch>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePathMatch {
    #[serde(default)]
    pub exact: Option<S<String>>,
    #[serde(default)]
    pub prefix: Option<S<String>>,
    #[serde(default)]
    pub regex: Option<S<String>>,
    #[serde(default)]
    pub template: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileValueMatch {
    pub name: S<String>,
    #[serde(default)]
    pub exact: Option<S<String>>,
    #[serde(default)]
    pub regex: Option<S<String>>,
    #[serde(default)]
    pub present: Option<S<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRewrite {
    #[serde(default)]
    pub prefix: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHeaderOps {
    #[serde(default)]
    pub add: BTreeMap<String, S<String>>,
    #[serde(default)]
    pub remove: Vec<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCluster {
    pub endpoints: S<Vec<S<String>>>,
    #[serde(default)]
    pub protocol: Option<S<String>>,
    #[serde(default)]
    pub balance: Option<S<String>>,
    #[serde(default)]
    pub hash_on: Option<S<FileHashOn>>,
    #[serde(default)]
    pub connect_timeout: Option<S<String>>,
    #[serde(default)]
    pub timeout: Option<S<String>>,
    #[serde(default)]
    pub idle_timeout: Option<S<String>>,
    #[serde(default)]
    pub max_idle_per_endpoint: Option<S<u64>>,
    #[serde(default)]
    pub dns_refresh: Option<S<String>>,
    #[serde(default)]
    pub health_check: Option<FileHealthCheck>,
}

/// Where the consistent-hash key comes from: exactly one field.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHashOn {
    #[serde(default)]
    pub header: Option<S<String>>,
    #[serde(default)]
    pub query: Option<S<String>>,
    #[serde(default)]
    pub cookie: Option<S<String>>,
    #[serde(default)]
    pub capture: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHealthCheck {
    pub path: S<String>,
    #[serde(default)]
    pub interval: Option<S<String>>,
    #[serde(default)]
    pub timeout: Option<S<String>>,
    #[serde(default)]
    pub healthy_threshold: Option<S<u32>>,
    #[serde(default)]
    pub unhealthy_threshold: Option<S<u32>>,
}
