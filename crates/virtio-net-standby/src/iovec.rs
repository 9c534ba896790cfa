//! Copies between byte slices and the guest memory an `iovec` list describes:
//! [`copy_from_iovecs`] and [`copy_to_iovecs`], used by every path that reads or
//! writes a frame, a header or a control command in place (TX, RX, the control
//! queue, the backends), and [`copy_bytes`], the small-copy primitive beneath them.
//!
//! Every iovec handed to these functions must be valid for the access over its
//! whole length: they come from the frame types ([`TxFrame`](crate::TxFrame),
//! [`RxBuffers`](crate::RxBuffers)), whose constructors require it, or from the
//! device's chain walk over validated guest memory.

use std::ptr;

/// Copies `n` bytes. Small copies (most frames are small) are done inline with
/// overlapping unaligned 16-byte moves instead of a call into libc.
///
/// # Safety
/// `src` must be readable and `dst` writable for `n` bytes, and they must not
/// overlap.
#[inline(always)]
pub(crate) unsafe fn copy_bytes(dst: *mut u8, src: *const u8, n: usize) {
    type Chunk = [u8; 16];
    // SAFETY: in every arm, each read and write stays within `0..n` of `src` and
    // `dst` respectively, which the caller guarantees are valid and disjoint.
    unsafe {
        let mv = |o: usize| {
            let v = ptr::read_unaligned(src.add(o) as *const Chunk);
            ptr::write_unaligned(dst.add(o) as *mut Chunk, v);
        };
        match n {
            0..=15 => ptr::copy_nonoverlapping(src, dst, n),
            16..=32 => {
                mv(0);
                mv(n - 16);
            }
            33..=64 => {
                mv(0);
                mv(16);
                mv(n - 32);
                mv(n - 16);
            }
            65..=128 => {
                for o in [0, 16, 32, 48] {
                    mv(o);
                }
                for o in [64, 48, 32, 16] {
                    mv(n - o);
                }
            }
            _ => ptr::copy_nonoverlapping(src, dst, n),
        }
    }
}

/// Copies from byte `offset` of the memory `iov` describes into `dst`.
#[inline(always)]
pub(crate) fn copy_from_iovecs(iov: &[libc::iovec], offset: usize, dst: &mut [u8]) -> usize {
    if let [v] = iov {
        // One buffer: the common case, inlined.
        let n = v.iov_len.saturating_sub(offset).min(dst.len());
        // SAFETY: the iovec is readable for `iov_len` bytes (constructor contract
        // of the frame types, `TxFrame` and `RxBuffers`); `offset + n <= iov_len`
        // and `n <= dst.len()`.
        unsafe { copy_bytes(dst.as_mut_ptr(), (v.iov_base as *const u8).add(offset), n) };
        return n;
    }
    copy_from_iovecs_slow(iov, offset, dst)
}

#[inline(never)]
fn copy_from_iovecs_slow(iov: &[libc::iovec], mut offset: usize, dst: &mut [u8]) -> usize {
    let mut done = 0;
    for v in iov {
        if done == dst.len() {
            break;
        }
        if offset >= v.iov_len {
            offset -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - offset).min(dst.len() - done);
        // SAFETY: the iovec is readable for `iov_len` bytes (constructor
        // contract of the frame types, `TxFrame` and `RxBuffers`, which are the
        // only callers' sources); `offset + n <= iov_len` and `done + n <= dst.len()`.
        unsafe {
            copy_bytes(
                dst.as_mut_ptr().add(done),
                (v.iov_base as *const u8).add(offset),
                n,
            );
        }
        done += n;
        offset = 0;
    }
    done
}

/// Copies `src` to byte `offset` of the memory `iov` describes.
#[inline(always)]
pub(crate) fn copy_to_iovecs(iov: &[libc::iovec], offset: usize, src: &[u8]) -> usize {
    if let [v] = iov {
        let n = v.iov_len.saturating_sub(offset).min(src.len());
        // SAFETY: the iovec is writable for `iov_len` bytes (constructor contract
        // of `RxBuffers` and of the staged buffers); `offset + n <= iov_len`.
        unsafe { copy_bytes((v.iov_base as *mut u8).add(offset), src.as_ptr(), n) };
        return n;
    }
    copy_to_iovecs_slow(iov, offset, src)
}

#[inline(never)]
fn copy_to_iovecs_slow(iov: &[libc::iovec], mut offset: usize, src: &[u8]) -> usize {
    let mut done = 0;
    for v in iov {
        if done == src.len() {
            break;
        }
        if offset >= v.iov_len {
            offset -= v.iov_len;
            continue;
        }
        let n = (v.iov_len - offset).min(src.len() - done);
        // SAFETY: the iovec is writable for `iov_len` bytes (constructor contract
        // of `RxBuffers` and of the device's staged buffers); bounds as above.
        unsafe {
            copy_bytes(
                (v.iov_base as *mut u8).add(offset),
                src.as_ptr().add(done),
                n,
            );
        }
        done += n;
        offset = 0;
    }
    done
}

/// An iovec over `b`, for tests.
#[cfg(test)]
pub(crate) fn iov(b: &mut [u8]) -> libc::iovec {
    libc::iovec {
        iov_base: b.as_mut_ptr().cast(),
        iov_len: b.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_copies_are_exact_at_every_length() {
        let src: Vec<u8> = (0..300u32).map(|i| (i * 7 + 1) as u8).collect();
        for n in 0..300 {
            let mut dst = vec![0u8; 302];
            // SAFETY: both buffers hold at least n bytes (+1 for the offset).
            unsafe { copy_bytes(dst.as_mut_ptr().add(1), src.as_ptr(), n) };
            assert_eq!(&dst[1..1 + n], &src[..n], "n = {n}");
            assert_eq!(dst[0], 0);
            assert!(dst[1 + n..].iter().all(|b| *b == 0), "n = {n}: no overrun");
        }
    }

    #[test]
    fn copies_across_iovecs() {
        let mut a = [0u8; 5];
        let mut b = [0u8; 3];
        let mut c = [0u8; 10];
        let v = [iov(&mut a), iov(&mut b), iov(&mut c)];
        let src: Vec<u8> = (1..=18).collect();
        assert_eq!(copy_to_iovecs(&v, 0, &src), 18);
        let mut out = [0u8; 18];
        assert_eq!(copy_from_iovecs(&v, 0, &mut out), 18);
        assert_eq!(&out[..], &src[..]);
        // Offsets that land inside and past iovecs.
        let mut two = [0u8; 2];
        assert_eq!(copy_from_iovecs(&v, 4, &mut two), 2);
        assert_eq!(two, [5, 6]);
        assert_eq!(copy_to_iovecs(&v, 17, &[99, 98]), 1);
        assert_eq!(copy_from_iovecs(&v, 30, &mut two), 0);
    }
}
