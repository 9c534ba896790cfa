//! The peer's side of a [`pair`](crate::pair) end: [`pair_send`] and
//! [`pair_recv`] move one frame in or out, as the device at the other end would.

use crate::backend::NetBackend;

/// Sends `frame` (header included) into a pair end, as if a peer device had.
pub fn pair_send(end: &mut crate::PairBackend, frame: &[u8]) -> std::io::Result<()> {
    let iov = [libc::iovec {
        iov_base: frame.as_ptr() as *mut libc::c_void,
        iov_len: frame.len(),
    }];
    // SAFETY: the iovec describes `frame`, readable for its length, and the
    // backend only reads through it.
    let f = unsafe { crate::TxFrame::new(&iov, frame.len()) };
    end.send(&f)?;
    end.flush()
}

/// Receives the next frame (header included) a pair end holds.
pub fn pair_recv(end: &mut crate::PairBackend) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; crate::header::MAX_BUFFER_LEN];
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec describes `buf`, writable for its length, untouched
    // meanwhile.
    let mut b = unsafe { crate::RxBuffers::new(&iov, buf.len()) };
    let n = end.recv(&mut b)?;
    end.flush()?;
    buf.truncate(n);
    Ok(buf)
}
