//! Why a configuration was refused.

use std::path::{Path, PathBuf};

/// Why a configuration was refused. Its text names the setting and the
/// value that were wrong, or the file that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The TOML does not parse, or has an unknown key or a wrong type.
    #[error("{}", parse_text(path.as_deref(), *line, key.as_deref(), message))]
    Parse {
        /// The file, when the text came from one.
        path: Option<PathBuf>,
        line: Option<usize>,
        /// The key of the offending line, when the message does not name it.
        key: Option<String>,
        message: String,
    },
    /// A setting's value, or a combination of settings, is refused.
    #[error("{reason}")]
    Setting {
        /// The setting refused (the first, of a combination).
        key: &'static str,
        /// What is wrong, naming the setting and its value.
        reason: String,
    },
    /// A file a setting names (a token, a certificate) cannot be used.
    #[error("{reason}")]
    File { key: &'static str, reason: String },
    /// The settings resolve to a node configuration the node refuses.
    #[error(transparent)]
    Node(#[from] crate::error::Error),
}

impl ConfigError {
    pub(super) fn setting(key: &'static str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Setting {
            key,
            reason: reason.into(),
        }
    }

    pub(super) fn file(key: &'static str) -> impl Fn(String) -> ConfigError {
        move |reason| ConfigError::File { key, reason }
    }
}

fn parse_text(
    path: Option<&Path>,
    line: Option<usize>,
    key: Option<&str>,
    message: &str,
) -> String {
    let mut out = String::new();
    if let Some(path) = path {
        out.push_str(&format!("config file {}: ", path.display()));
    }
    if let Some(line) = line {
        out.push_str(&format!("line {line}: "));
    }
    if let Some(key) = key {
        out.push_str(&format!("{key}: "));
    }
    out + message
}
