//! Content ids: the BLAKE3 hash of what they name, printed as `blake3:<64 hex digits>`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Prefix of a printed content id.
pub const CONTENT_ID_PREFIX: &str = "blake3:";

/// The BLAKE3 hash of some content (a blob, a model's files).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentId(pub [u8; 32]);

impl ContentId {
    /// The id of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    /// The id of a directory: a hash over its files' relative paths and their ids, in path
    /// order, so that the same files give the same id wherever they lie.
    pub fn of_manifest<'a>(files: impl IntoIterator<Item = (&'a str, ContentId)>) -> Self {
        let mut files: Vec<(&str, ContentId)> = files.into_iter().collect();
        files.sort_by(|a, b| a.0.cmp(b.0));
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"mycel-manifest-v1\n");
        for (path, id) in files {
            hasher.update(path.as_bytes());
            hasher.update(b"\0");
            hasher.update(&id.0);
            hasher.update(b"\n");
        }
        Self(*hasher.finalize().as_bytes())
    }

    /// The first 12 hex digits, for tables and logs.
    pub fn short(&self) -> String {
        self.to_string()[CONTENT_ID_PREFIX.len()..CONTENT_ID_PREFIX.len() + 12].to_owned()
    }
}

impl fmt::Display for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(CONTENT_ID_PREFIX)?;
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentId({self})")
    }
}

/// Why a string is not a content id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a content id (expected {CONTENT_ID_PREFIX} and 64 hex digits): {0:?}")]
pub struct BadContentId(pub String);

impl FromStr for ContentId {
    type Err = BadContentId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadContentId(s.chars().take(80).collect());
        let hex = s.strip_prefix(CONTENT_ID_PREFIX).ok_or_else(bad)?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Self(out))
    }
}

impl Serialize for ContentId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ContentId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        let id: Self = s.parse().map_err(serde::de::Error::custom)?;
        // One text per id in what is signed and stored: the printed (lower-case) form only.
        if s[CONTENT_ID_PREFIX.len()..]
            .bytes()
            .any(|b| b.is_ascii_uppercase())
        {
            return Err(serde::de::Error::custom(format!(
                "content id {s:?} is not in lower case"
            )));
        }
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_and_parses_back() {
        let id = ContentId::of(b"hello");
        let text = id.to_string();
        assert!(text.starts_with("blake3:") && text.len() == 7 + 64);
        assert_eq!(text.parse::<ContentId>().unwrap(), id);
        assert_eq!(id.short().len(), 12);
        for bad in [
            "",
            "blake3:",
            "sha256:00",
            &text[..70],
            &text.replace('b', "x"),
        ] {
            assert!(bad.parse::<ContentId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn manifests_ignore_listing_order_but_not_names() {
        let (a, b) = (ContentId::of(b"a"), ContentId::of(b"b"));
        let one = ContentId::of_manifest([("x", a), ("y", b)]);
        assert_eq!(one, ContentId::of_manifest([("y", b), ("x", a)]));
        assert_ne!(one, ContentId::of_manifest([("x", b), ("y", a)]));
        assert_ne!(one, ContentId::of_manifest([("x", a)]));
    }
}
