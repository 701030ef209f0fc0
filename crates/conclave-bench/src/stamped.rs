//! A TCP stream that remembers when the kernel received the bytes it reads (`SO_TIMESTAMPNS`).
//!
//! Latency is measured twice: when the receiving task has decoded the message (what a client
//! sees), and when its bytes reached the receiving socket (what the server and the network
//! cost, without the time the message then waits for the generator's own CPU). On a machine
//! with two CPUs, one for the server and one for a generator that reads a hundred connections,
//! the two can differ by more than the server's whole share: the second separates them.
//!
//! The kernel stamps a segment with `CLOCK_REALTIME` as it enters the receiving host's stack
//! (on loopback: while the server's `send` runs). A read reports the stamp of the last segment
//! it took, so when one read takes several messages, all get the latest arrival among them: the
//! figure can only be too high, never too low.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// The arrival time of the last bytes a [`StampedTcp`] read: `CLOCK_REALTIME` nanoseconds,
/// 0 before the first stamped read. Shared, so a reader can look it up through any layers
/// (TLS, buffers, split halves) stacked on the stream.
#[derive(Clone, Default)]
pub struct Arrival(Arc<AtomicU64>);

impl Arrival {
    /// How long ago the last read's bytes arrived, in nanoseconds (`None` before any stamp,
    /// or when the clock stepped back in between).
    pub fn age_ns(&self) -> Option<u64> {
        let at = self.0.load(Ordering::Relaxed);
        if at == 0 {
            return None;
        }
        realtime_ns()?.checked_sub(at)
    }
}

/// `CLOCK_REALTIME` now, in nanoseconds: the kernel's clock for receive stamps.
fn realtime_ns() -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) } != 0 {
        return None;
    }
    timespec_ns(&ts)
}

fn timespec_ns(ts: &libc::timespec) -> Option<u64> {
    let s = u64::try_from(ts.tv_sec).ok()?;
    let ns = u64::try_from(ts.tv_nsec).ok()?;
    s.checked_mul(1_000_000_000)?.checked_add(ns)
}

pub struct StampedTcp {
    tcp: TcpStream,
    arrival: Arrival,
}

impl StampedTcp {
    /// Asks the kernel to stamp what this socket receives. Where it refuses, reads still work
    /// and [`Arrival::age_ns`] stays `None`.
    pub fn new(tcp: TcpStream) -> StampedTcp {
        let on: libc::c_int = 1;
        // SAFETY: a valid socket, a valid option pointer and its exact length.
        unsafe {
            libc::setsockopt(
                tcp.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMPNS,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        StampedTcp {
            tcp,
            arrival: Arrival::default(),
        }
    }

    pub fn arrival(&self) -> Arrival {
        self.arrival.clone()
    }

    /// One `recvmsg` into `buf`: the byte count and the stamp of the last segment read.
    fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, Option<u64>)> {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // Room for one SCM_TIMESTAMPNS (a timespec) with its header, 8-aligned.
        let mut control = [0u64; 8];
        // SAFETY: msghdr is plain data; zeroed is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: every pointer in `msg` is valid for its length for the call's duration.
        let n = unsafe { libc::recvmsg(self.tcp.as_raw_fd(), &mut msg, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut stamp = None;
        // SAFETY: walking the control messages the kernel wrote, with the libc macros, inside
        // the buffer `msg` describes.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                    let ts = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::timespec>());
                    stamp = timespec_ns(&ts);
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        Ok((n as usize, stamp))
    }
}

impl AsyncRead for StampedTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            ready!(this.tcp.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let got = this.tcp.try_io(Interest::READABLE, || this.recv(unfilled));
            match got {
                Ok((n, stamp)) => {
                    if let Some(at) = stamp.filter(|_| n > 0) {
                        this.arrival.0.store(at, Ordering::Relaxed);
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for StampedTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn reads_are_stamped_on_arrival() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let mut rx = StampedTcp::new(client.unwrap());
        let (mut tx, _) = server.unwrap();
        let arrival = rx.arrival();
        assert!(arrival.age_ns().is_none(), "no stamp before the first read");

        // The kernel turns receive stamping on a moment after the first socket asks (it flips
        // a static key from a work queue): the first reads may come unstamped. Bounded retry.
        let mut age = None;
        for _ in 0..20 {
            tx.write_all(b"hello").await.unwrap();
            // Let the bytes wait in the socket before reading them: the stamp is their
            // arrival, not the read.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let mut got = [0u8; 5];
            tokio::time::timeout(std::time::Duration::from_secs(5), rx.read_exact(&mut got))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&got, b"hello");
            age = arrival.age_ns();
            if age.is_some() {
                break;
            }
        }
        let age = age.expect("a stamped read within 20 tries");
        assert!(
            (40_000_000..5_000_000_000).contains(&age),
            "the stamp is the arrival, about 50 ms before now: {age} ns"
        );

        // Writes pass through.
        rx.write_all(b"back").await.unwrap();
        let mut back = [0u8; 4];
        tx.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"back");
    }
}
