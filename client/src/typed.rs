//! Typed calls (cargo feature `typed`): the request and response of a
//! [`Command`] as Rust types (serde, postcard's compact format), over the
//! same connection as the raw calls. The server registers the command with
//! `ServiceBuilder::typed`.
//!
//! ```no_run
//! use coroipc_client::typed::Command;
//! use coroipc_client::Client;
//!
//! /// Adds to the connection's counter; answers the new value.
//! struct Add;
//! impl Command for Add {
//!     const ID: u16 = 1;
//!     type Request = u64;
//!     type Response = u64;
//! }
//!
//! let client = Client::connect("@counter", 2)?;
//! let total: u64 = client.call_typed::<Add>(&5)?;
//! # Ok::<(), coroipc_client::Error>(())
//! ```

use std::io::IoSlice;
use std::time::Duration;

pub use coroipc_transport::typed::{decode, encode, CodecError, Command};

use crate::{Client, Error, Result};

/// The response bytes of command `K`, decoded; a response that does not
/// decode is the server breaking the command's contract.
pub(crate) fn decode_response<K: Command>(bytes: &[u8]) -> Result<K::Response> {
    decode(bytes)
        .map_err(|e| Error::Protocol(format!("command {}: the response does not decode: {e}", K::ID)))
}

/// The request of command `K`, encoded; a request that does not encode (a
/// custom `Serialize` that fails) is the caller's error.
pub(crate) fn encode_request<K: Command>(request: &K::Request) -> Result<Vec<u8>> {
    encode(request).map_err(|_| Error::Invalid)
}

impl Client {
    /// Calls the typed command `K`: encodes `request`, waits for the
    /// answer, decodes it (reading it in place, no copy of the response).
    ///
    /// # Errors
    ///
    /// As [`call_timeout`](Client::call_timeout); [`Error::Invalid`] also
    /// if the server could not decode the request (or `request` does not
    /// encode); [`Error::Service`] and the other statuses as the handler
    /// answered them; [`Error::Protocol`] if the response does not decode
    /// as `K::Response`.
    pub fn call_typed<K: Command>(&self, request: &K::Request) -> Result<K::Response> {
        self.call_typed_timeout::<K>(request, None)
    }

    /// [`call_typed`](Self::call_typed) with a bound on the whole call.
    ///
    /// # Errors
    ///
    /// As [`call_typed`](Self::call_typed), and [`Error::Timeout`].
    pub fn call_typed_timeout<K: Command>(
        &self,
        request: &K::Request,
        timeout: Option<Duration>,
    ) -> Result<K::Response> {
        let bytes = encode_request::<K>(request)?;
        let response = self.call_in_place(K::ID, &[IoSlice::new(&bytes)], timeout)?;
        decode_response::<K>(&response)
    }
}

#[cfg(feature = "tokio")]
impl crate::AsyncClient {
    /// Calls the typed command `K` (see [`Client::call_typed`]).
    ///
    /// # Cancel safety
    ///
    /// As [`AsyncClient::call`](crate::AsyncClient::call).
    ///
    /// # Errors
    ///
    /// As [`Client::call_typed`].
    pub async fn call_typed<K: Command>(&self, request: &K::Request) -> Result<K::Response> {
        let bytes = encode_request::<K>(request)?;
        let response = self.call(K::ID, &bytes).await?;
        decode_response::<K>(&response)
    }
}
