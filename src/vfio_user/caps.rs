//! The capabilities JSON exchanged in VERSION.

use serde_json::{json, Value};

/// Defaults the spec gives for capabilities a peer leaves out.
pub const DEFAULT_MAX_MSG_FDS: u32 = 1;
pub const DEFAULT_MAX_DATA_XFER_SIZE: u32 = 1024 * 1024;

/// What one side announces. Unknown keys are kept, so extensions pass through.
#[derive(Clone, Debug, PartialEq)]
pub struct Capabilities {
    pub max_msg_fds: u32,
    pub max_data_xfer_size: u32,
    pub pgsizes: u64,
    pub max_dma_maps: u32,
    pub write_multiple: bool,
    /// The whole `capabilities` object as received or sent.
    pub raw: Value,
}

#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error("capabilities are not valid UTF-8 JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("capabilities JSON has no \"capabilities\" object")]
    NoObject,
    #[error("capability {0} has the wrong type or range")]
    BadField(&'static str),
}

impl Capabilities {
    /// Parses the JSON text of a VERSION message (trailing NULs allowed; an empty
    /// text means all defaults).
    pub fn parse(text: &[u8]) -> Result<Self, CapsError> {
        let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
        let text = &text[..end];
        if text.iter().all(u8::is_ascii_whitespace) {
            return Self::from_object(json!({}));
        }
        let v: Value = serde_json::from_slice(text)?;
        let obj = v.get("capabilities").cloned().ok_or(CapsError::NoObject)?;
        if !obj.is_object() {
            return Err(CapsError::NoObject);
        }
        Self::from_object(obj)
    }

    fn from_object(obj: Value) -> Result<Self, CapsError> {
        let u = |name: &'static str, default: u64| -> Result<u64, CapsError> {
            match obj.get(name) {
                None => Ok(default),
                Some(v) => v.as_u64().ok_or(CapsError::BadField(name)),
            }
        };
        let u32_field = |name: &'static str, default: u32| -> Result<u32, CapsError> {
            u32::try_from(u(name, u64::from(default))?).map_err(|_| CapsError::BadField(name))
        };
        Ok(Capabilities {
            max_msg_fds: u32_field("max_msg_fds", DEFAULT_MAX_MSG_FDS)?,
            max_data_xfer_size: u32_field("max_data_xfer_size", DEFAULT_MAX_DATA_XFER_SIZE)?,
            pgsizes: u("pgsizes", 4096)?,
            max_dma_maps: u32_field("max_dma_maps", u32::MAX)?,
            write_multiple: match obj.get("write_multiple") {
                None => false,
                Some(v) => v.as_bool().ok_or(CapsError::BadField("write_multiple"))?,
            },
            raw: obj,
        })
    }

    /// The NUL-terminated JSON text for a VERSION message.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        let mut obj = self.raw.as_object().cloned().unwrap_or_default();
        obj.insert("max_msg_fds".into(), json!(self.max_msg_fds));
        obj.insert("max_data_xfer_size".into(), json!(self.max_data_xfer_size));
        obj.insert("pgsizes".into(), json!(self.pgsizes));
        obj.insert("max_dma_maps".into(), json!(self.max_dma_maps));
        if self.write_multiple {
            obj.insert("write_multiple".into(), json!(true));
        }
        let mut bytes = json!({ "capabilities": obj }).to_string().into_bytes();
        bytes.push(0);
        bytes
    }

    /// The `capabilities` object as compact JSON.
    pub fn raw_json(&self) -> String {
        self.raw.to_string()
    }

    /// Capabilities with the given limits and no extensions.
    pub fn new(
        max_msg_fds: u32,
        max_data_xfer_size: u32,
        max_dma_maps: u32,
        write_multiple: bool,
    ) -> Self {
        Capabilities {
            max_msg_fds,
            max_data_xfer_size,
            pgsizes: 4096,
            max_dma_maps,
            write_multiple,
            raw: json!({}),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_round_trip() {
        let c = Capabilities::parse(b"{\"capabilities\":{}}\0").unwrap();
        assert_eq!(c.max_msg_fds, 1);
        assert_eq!(c.max_data_xfer_size, 1 << 20);
        let ours = Capabilities::new(16, 1 << 20, 65536, true);
        let back = Capabilities::parse(&ours.to_json_bytes()).unwrap();
        assert_eq!(back.max_msg_fds, 16);
        assert!(back.write_multiple);
        assert_eq!(back.max_dma_maps, 65536);
    }

    #[test]
    fn hostile_json() {
        assert!(Capabilities::parse(b"{").is_err());
        assert!(Capabilities::parse(b"{\"capabilities\":3}").is_err());
        assert!(Capabilities::parse(b"{\"capabilities\":{\"max_msg_fds\":-1}}").is_err());
        assert!(Capabilities::parse(b"{\"capabilities\":{\"max_msg_fds\":99999999999}}").is_err());
        assert!(Capabilities::parse(b"").is_ok());
    }
}
