//! Saved state from an untrusted migration stream, for every type with the
//! state contract: decode, restore into a freshly built device, and check what
//! comes back.

use device_state::{Encode, Persist, crc32, from_bytes, to_bytes};
use libfuzzer_sys::arbitrary::{self, Arbitrary};

/// How the fuzzer's bytes become a saved state.
#[derive(Arbitrary, Debug)]
pub enum Bytes {
    /// The whole stream as is (magic, version, length, body, CRC).
    Raw(Vec<u8>),
    /// A body, framed with the type's header and a correct CRC.
    Body(Vec<u8>),
    /// A valid state of the type with bytes of its body changed, cut or
    /// extended, then framed with a correct CRC.
    Edited {
        /// `(position, xor)` pairs applied to the body.
        xors: Vec<(u16, u8)>,
        /// Cut the body to this length (modulo its length + 1), if set.
        cut: Option<u16>,
        /// Bytes appended to the body.
        tail: Vec<u8>,
    },
}

const HEADER_LEN: usize = 16;

/// Frames `body` as a `T` with a correct header and CRC.
pub fn frame<T: Encode>(body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + body.len() + 4);
    v.extend_from_slice(&T::MAGIC);
    v.extend_from_slice(&T::VERSION.to_le_bytes());
    v.extend_from_slice(&0u16.to_le_bytes());
    v.extend_from_slice(&(body.len() as u32).to_le_bytes());
    v.extend_from_slice(body);
    let crc = crc32(&v);
    v.extend_from_slice(&crc.to_le_bytes());
    v
}

/// The bytes `input` stands for, given a valid state of the type.
pub fn bytes<T: Encode>(valid: &T, input: &Bytes) -> Vec<u8> {
    match input {
        Bytes::Raw(b) => b.clone(),
        Bytes::Body(b) => frame::<T>(b),
        Bytes::Edited { xors, cut, tail } => {
            let full = to_bytes(valid);
            let mut body = full[HEADER_LEN..full.len() - 4].to_vec();
            for (pos, x) in xors {
                if !body.is_empty() {
                    let i = usize::from(*pos) % body.len();
                    body[i] ^= x;
                }
            }
            if let Some(c) = cut {
                body.truncate(usize::from(*c) % (body.len() + 1));
            }
            body.extend_from_slice(tail);
            frame::<T>(&body)
        }
    }
}

/// Decodes `input` as `P::State` and restores it into `mk()`. Checks: what
/// decodes re-encodes to the same state; a restore either fails (and the
/// device still saves) or yields a device whose saved state restores into
/// another fresh device and saves identically (a fixpoint).
pub fn check<P: Persist>(mk: impl Fn() -> P, valid: &P::State, input: &Bytes) {
    let b = bytes(valid, input);
    let Ok(state) = from_bytes::<P::State>(&b) else {
        return;
    };
    let again = to_bytes(&state);
    assert_eq!(
        from_bytes::<P::State>(&again).as_ref().ok(),
        Some(&state),
        "a decoded state does not survive its own encoding"
    );
    let mut dev = mk();
    match dev.restore(&state) {
        Err(e) => {
            // The refusal is a message, and the device is still usable.
            assert!(!e.to_string().is_empty());
            let _ = dev.save();
        }
        Ok(()) => {
            let saved = dev.save().expect("a restored device saves");
            let mut second = mk();
            second.restore(&saved).unwrap_or_else(|e| {
                panic!("a device refuses the state its twin saved after restoring: {e}\n{saved:?}")
            });
            assert_eq!(
                second.save().expect("saves"),
                saved,
                "the saved state of a restored device does not round-trip"
            );
        }
    }
}
