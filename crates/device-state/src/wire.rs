//! The bounded, CRC-checked binary form of a state.
//!
//! ```text
//! magic [u8; 8] | version u16 | reserved u16 | body length u32 | body | CRC-32 u32
//! ```
//!
//! All little-endian; the CRC (IEEE 802.3, as zlib computes it) covers everything
//! before it. The body is the state's [`Encode::encode`] output; nested states are
//! written without a header of their own, so one header and one checksum cover a
//! whole device.
//!
//! [`Reader`] checks every length against the bytes that remain before it reads
//! or allocates: a count of a billion items in a 100-byte input is refused at
//! once as [`Error::Truncated`], however the checksum was forged.

use crate::error::{Error, Result};

/// A state type's binary form.
pub trait Encode: Sized {
    /// Identifies the type at the start of its top-level form.
    const MAGIC: [u8; 8];
    /// The format version this build writes and reads. Bump it when the layout
    /// changes.
    const VERSION: u16;

    /// Appends the body.
    fn encode(&self, w: &mut Writer);

    /// Reads a body written by [`encode`](Encode::encode). Must return an error,
    /// never panic, on any input.
    fn decode(r: &mut Reader<'_>) -> Result<Self>;
}

const HEADER_LEN: usize = 8 + 2 + 2 + 4;

fn magic_name(m: &[u8; 8]) -> String {
    String::from_utf8_lossy(m)
        .trim_end_matches('\0')
        .to_string()
}

/// Encodes `state` with its header and checksum.
pub fn to_bytes<T: Encode>(state: &T) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(256));
    w.raw(&T::MAGIC);
    w.u16(T::VERSION);
    w.u16(0);
    w.u32(0);
    state.encode(&mut w);
    let body = w.0.len() - HEADER_LEN;
    let len = u32::try_from(body).unwrap_or(u32::MAX);
    w.0[12..16].copy_from_slice(&len.to_le_bytes());
    let crc = crc32(&w.0);
    w.u32(crc);
    w.0
}

/// Decodes a state written by [`to_bytes`]: magic, version, length and checksum
/// first, then the body, which must be consumed exactly.
pub fn from_bytes<T: Encode>(bytes: &[u8]) -> Result<T> {
    let mut r = Reader(bytes);
    let magic: [u8; 8] = r.array("the magic")?;
    if magic != T::MAGIC {
        return Err(Error::BadMagic {
            expected: magic_name(&T::MAGIC),
        });
    }
    let version = r.u16("the format version")?;
    if version != T::VERSION {
        return Err(Error::UnsupportedVersion {
            what: magic_name(&T::MAGIC),
            found: version,
            supported: T::VERSION,
        });
    }
    let _reserved = r.u16("the reserved field")?;
    let len = r.u32("the body length")? as usize;
    let body = r.take(len, "the body")?;
    let stored = r.u32("the checksum")?;
    if !r.0.is_empty() {
        return Err(Error::TrailingBytes(r.0.len()));
    }
    let computed = crc32(&bytes[..HEADER_LEN + len]);
    if computed != stored {
        return Err(Error::Checksum {
            expected: computed,
            found: stored,
        });
    }
    let mut b = Reader(body);
    let state = T::decode(&mut b)?;
    if !b.0.is_empty() {
        return Err(Error::TrailingBytes(b.0.len()));
    }
    Ok(state)
}

const fn crc_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

const CRC_TABLE: [u32; 256] = crc_table();

/// CRC-32 (IEEE 802.3, as zlib computes it).
pub fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for b in data {
        c = CRC_TABLE[((c ^ u32::from(*b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// Appends little-endian fields to a body.
#[derive(Debug, Default)]
pub struct Writer(Vec<u8>);

impl Writer {
    /// An empty body.
    pub fn new() -> Self {
        Writer(Vec::new())
    }

    /// The bytes written so far.
    pub fn into_inner(self) -> Vec<u8> {
        self.0
    }

    /// A byte.
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    /// A boolean as one byte, 0 or 1.
    pub fn bool(&mut self, v: bool) {
        self.u8(u8::from(v));
    }
    /// A `u16`.
    pub fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// A `u32`.
    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// A `u64`.
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// Bytes of a length both sides know (no length prefix).
    pub fn raw(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    /// A count or length as a `u32`.
    pub fn len(&mut self, n: usize) {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }
    /// Length-prefixed bytes.
    pub fn bytes(&mut self, b: &[u8]) {
        self.len(b.len());
        self.raw(b);
    }
    /// A length-prefixed UTF-8 string.
    pub fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    /// A nested state, without a header of its own.
    pub fn put<T: Encode>(&mut self, v: &T) {
        v.encode(self);
    }
    /// A count, then each item.
    pub fn seq<T>(&mut self, items: &[T], mut each: impl FnMut(&mut Writer, &T)) {
        self.len(items.len());
        for i in items {
            each(self, i);
        }
    }
    /// An optional nested value: a presence byte, then the value.
    pub fn opt<T>(&mut self, v: Option<&T>, each: impl FnOnce(&mut Writer, &T)) {
        self.bool(v.is_some());
        if let Some(v) = v {
            each(self, v);
        }
    }
}

/// Reads little-endian fields from a body, never past its end.
///
/// Every read names the field it reads, so a truncated input says where it
/// ended.
#[derive(Debug)]
pub struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// A reader over a body (as [`Writer::into_inner`] returned it).
    pub fn new(body: &'a [u8]) -> Self {
        Reader(body)
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.0.len()
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(Error::Truncated(what));
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Ok(h)
    }
    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }
    /// A byte.
    pub fn u8(&mut self, what: &'static str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }
    /// A boolean; anything but 0 or 1 is [`Error::Invalid`].
    pub fn bool(&mut self, what: &'static str) -> Result<bool> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(Error::Invalid(format!("{what} is {v}, not a boolean"))),
        }
    }
    /// A `u16`.
    pub fn u16(&mut self, what: &'static str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    /// A `u32`.
    pub fn u32(&mut self, what: &'static str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    /// A `u64`.
    pub fn u64(&mut self, what: &'static str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    /// A count of items of at least `min_item_size` bytes each, refused at once
    /// if that many could not fit in what remains.
    pub fn count(&mut self, min_item_size: usize, what: &'static str) -> Result<usize> {
        let n = self.u32(what)? as usize;
        if n.saturating_mul(min_item_size.max(1)) > self.0.len() {
            return Err(Error::Truncated(what));
        }
        Ok(n)
    }
    /// Length-prefixed bytes.
    pub fn bytes(&mut self, what: &'static str) -> Result<Vec<u8>> {
        let n = self.count(1, what)?;
        Ok(self.take(n, what)?.to_vec())
    }
    /// A length-prefixed UTF-8 string.
    pub fn str(&mut self, what: &'static str) -> Result<String> {
        String::from_utf8(self.bytes(what)?)
            .map_err(|_| Error::Invalid(format!("{what} is not UTF-8")))
    }
    /// A nested state.
    pub fn get<T: Encode>(&mut self) -> Result<T> {
        T::decode(self)
    }
    /// A count, then that many items, each at least `min_item_size` bytes.
    pub fn seq<T>(
        &mut self,
        min_item_size: usize,
        what: &'static str,
        mut each: impl FnMut(&mut Reader<'a>) -> Result<T>,
    ) -> Result<Vec<T>> {
        let n = self.count(min_item_size, what)?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(each(self)?);
        }
        Ok(v)
    }
    /// An optional value written by [`Writer::opt`].
    pub fn opt<T>(
        &mut self,
        what: &'static str,
        each: impl FnOnce(&mut Reader<'a>) -> Result<T>,
    ) -> Result<Option<T>> {
        if self.bool(what)? {
            Ok(Some(each(self)?))
        } else {
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    struct Sample {
        a: u8,
        b: u16,
        c: u32,
        d: u64,
        flag: bool,
        name: String,
        list: Vec<u16>,
        maybe: Option<u32>,
    }

    impl Encode for Sample {
        const MAGIC: [u8; 8] = *b"SAMPLE\0\0";
        const VERSION: u16 = 3;
        fn encode(&self, w: &mut Writer) {
            w.u8(self.a);
            w.u16(self.b);
            w.u32(self.c);
            w.u64(self.d);
            w.bool(self.flag);
            w.str(&self.name);
            w.seq(&self.list, |w, v| w.u16(*v));
            w.opt(self.maybe.as_ref(), |w, v| w.u32(*v));
        }
        fn decode(r: &mut Reader<'_>) -> Result<Self> {
            Ok(Sample {
                a: r.u8("a")?,
                b: r.u16("b")?,
                c: r.u32("c")?,
                d: r.u64("d")?,
                flag: r.bool("flag")?,
                name: r.str("name")?,
                list: r.seq(2, "list", |r| r.u16("list item"))?,
                maybe: r.opt("maybe", |r| r.u32("maybe value"))?,
            })
        }
    }

    fn sample() -> Sample {
        Sample {
            a: 1,
            b: 0x0203,
            c: 0x0405_0607,
            d: u64::MAX - 1,
            flag: true,
            name: "net1".into(),
            list: vec![1, 2, 3],
            maybe: Some(9),
        }
    }

    #[test]
    fn crc_matches_zlib() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn roundtrip() {
        let s = sample();
        let b = to_bytes(&s);
        assert_eq!(&b[..8], b"SAMPLE\0\0");
        assert_eq!(from_bytes::<Sample>(&b), Ok(s));
        let none = Sample {
            maybe: None,
            list: vec![],
            ..sample()
        };
        assert_eq!(from_bytes::<Sample>(&to_bytes(&none)), Ok(none));
    }

    #[test]
    fn every_corruption_is_an_error_never_a_panic() {
        let b = to_bytes(&sample());
        // Every truncation.
        for n in 0..b.len() {
            assert!(from_bytes::<Sample>(&b[..n]).is_err(), "truncated at {n}");
        }
        // Every single-bit flip.
        for i in 0..b.len() {
            for bit in 0..8 {
                let mut c = b.clone();
                c[i] ^= 1 << bit;
                assert!(from_bytes::<Sample>(&c).is_err(), "flip {i}.{bit}");
            }
        }
        let mut c = b.clone();
        c.push(0);
        assert!(matches!(
            from_bytes::<Sample>(&c),
            Err(Error::TrailingBytes(1))
        ));
    }

    #[test]
    fn header_errors_name_the_type() {
        let mut b = to_bytes(&sample());
        b[0] = b'X';
        assert_eq!(
            from_bytes::<Sample>(&b).unwrap_err().to_string(),
            "not a saved SAMPLE (bad magic)"
        );
        let mut b = to_bytes(&sample());
        b[8] = 9;
        assert!(matches!(
            from_bytes::<Sample>(&b),
            Err(Error::UnsupportedVersion {
                found: 9,
                supported: 3,
                ..
            })
        ));
    }

    /// Re-seals a body with a valid header and checksum, as a forger would.
    fn seal(body: &[u8]) -> Vec<u8> {
        let mut w = Writer::new();
        w.raw(&Sample::MAGIC);
        w.u16(Sample::VERSION);
        w.u16(0);
        w.u32(body.len() as u32);
        w.raw(body);
        let mut v = w.into_inner();
        let crc = crc32(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }

    #[test]
    fn forged_huge_counts_are_refused_before_allocating() {
        let mut w = Writer::new();
        w.u8(1);
        w.u16(2);
        w.u32(3);
        w.u64(4);
        w.bool(false);
        w.u32(u32::MAX); // name length
        let e = from_bytes::<Sample>(&seal(&w.into_inner())).unwrap_err();
        assert_eq!(e, Error::Truncated("name"));

        let mut w = Writer::new();
        w.u8(1);
        w.u16(2);
        w.u32(3);
        w.u64(4);
        w.bool(false);
        w.str("x");
        w.u32(0x4000_0000); // list count
        let e = from_bytes::<Sample>(&seal(&w.into_inner())).unwrap_err();
        assert_eq!(e, Error::Truncated("list"));
    }

    #[test]
    fn invalid_fields_are_named() {
        let mut w = Writer::new();
        w.u8(1);
        w.u16(2);
        w.u32(3);
        w.u64(4);
        w.u8(2); // not a boolean
        let e = from_bytes::<Sample>(&seal(&w.into_inner())).unwrap_err();
        assert_eq!(e, Error::Invalid("flag is 2, not a boolean".into()));
    }
}
