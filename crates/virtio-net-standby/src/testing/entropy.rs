//! Where randomized drivers get their choices: the [`Entropy`] trait, a seeded
//! generator ([`Rng`]) and a fuzzer's input ([`InputBytes`]).

/// Where a randomized driver gets its choices: a generator in tests, a fuzzer's
/// input in fuzz targets.
pub trait Entropy {
    /// The next 64 bits.
    fn next_u64(&mut self) -> u64;

    /// A value in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `percent`/100.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// xorshift64*: a small deterministic generator for randomized tests.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Entropy for Rng {
    /// The next 64 random bits. The seed must not be zero.
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// A fuzzer's input as [`Entropy`]: 8 bytes per draw, zeros once it runs out.
#[derive(Debug, Clone)]
pub struct InputBytes<'a>(pub &'a [u8]);

impl InputBytes<'_> {
    /// Whether the input is used up.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Entropy for InputBytes<'_> {
    fn next_u64(&mut self) -> u64 {
        let n = self.0.len().min(8);
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        u64::from_le_bytes(b)
    }
}
