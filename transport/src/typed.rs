//! Typed messages (cargo feature `typed`): a command's request and
//! response as Rust types, serialised with serde into postcard's compact
//! format (varints, no field names; `postcard` 1.x, whose wire format is
//! stable). The server (`ServiceBuilder::typed`) and the client
//! (`Client::call_typed`) name the same [`Command`], so the two sides cannot
//! disagree on the command id or the types; the raw byte API stays
//! underneath and both can be mixed on one connection.
//!
//! ```
//! use coroipc_transport::typed::{decode, encode, Command};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize, Debug, PartialEq)]
//! struct Get { key: String }
//!
//! /// `get` of a configuration database: the value, if the key is set.
//! struct GetCmd;
//! impl Command for GetCmd {
//!     const ID: u16 = 3;
//!     type Request = Get;
//!     type Response = Option<Vec<u8>>;
//! }
//!
//! let bytes = encode(&Get { key: "totem.token".into() }).unwrap();
//! assert_eq!(bytes.len(), 1 + 11); // a varint length, then the bytes
//! assert_eq!(decode::<Get>(&bytes).unwrap(), Get { key: "totem.token".into() });
//! assert!(decode::<Get>(&[200]).is_err()); // a truncated string is an error, not a panic
//! ```

use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// One command of a service: its id and the types of its request and
/// response. Implement it on a unit struct and use that struct on both
/// sides.
pub trait Command {
    /// The command id (the same space as the raw handlers' ids).
    const ID: u16;
    /// What the client sends.
    type Request: Serialize + DeserializeOwned;
    /// What the server answers.
    type Response: Serialize + DeserializeOwned;
}

/// A value that does not encode or decode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodecError {
    what: String,
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "typed message codec: {}", self.what)
    }
}

impl std::error::Error for CodecError {}

impl From<postcard::Error> for CodecError {
    fn from(e: postcard::Error) -> Self {
        Self { what: e.to_string() }
    }
}

/// Serialises `value` in the typed-message format.
///
/// # Errors
///
/// [`CodecError`] if serde refuses the value (e.g. a map whose length is
/// unknown up front, or a custom `Serialize` that fails).
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    Ok(postcard::to_stdvec(value)?)
}

/// Deserialises a whole message: bytes left over are an error too (a
/// message is exactly one value).
///
/// # Errors
///
/// [`CodecError`] on malformed, truncated or trailing bytes; never panics,
/// whatever the bytes (they come from the peer).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, rest) = postcard::take_from_bytes(bytes)?;
    if !rest.is_empty() {
        return Err(CodecError { what: format!("{} trailing bytes after the value", rest.len()) });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_garbage_is_an_error() {
        let v: (u32, String, Vec<u64>, Option<bool>) = (7, "x".into(), vec![1, u64::MAX], Some(true));
        assert_eq!(decode::<(u32, String, Vec<u64>, Option<bool>)>(&encode(&v).unwrap()).unwrap(), v);
        let mut bytes = encode(&v).unwrap();
        bytes.push(0);
        assert!(decode::<(u32, String, Vec<u64>, Option<bool>)>(&bytes).is_err(), "trailing byte");
        // Every prefix and a few byte flips: errors or values, never a panic.
        let good = encode(&v).unwrap();
        for n in 0..good.len() {
            let _ = decode::<(u32, String, Vec<u64>, Option<bool>)>(&good[..n]);
        }
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0xff;
            let _ = decode::<(u32, String, Vec<u64>, Option<bool>)>(&b);
        }
        // A huge claimed length does not allocate it.
        assert!(decode::<Vec<u8>>(&[0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
    }
}
