//! Framed connections: a [`Codec`] joined to a byte stream, so callers read
//! and write whole messages (`read_frame` / `write_frame`, in the manner of
//! mini-redis's `Connection`) instead of hand-writing read → feed → decode
//! loops.
//!
//! * [`FrameReader`] / [`FrameWriter`]: blocking, over `std::io::Read` /
//!   `Write` (the guest agent wraps its nonblocking fds in a reader that
//!   polls with a stop signal, so a blocked read is still cancellable).
//! * [`AsyncFrameReader`] / [`AsyncFrameWriter`] (feature `tokio`): over
//!   tokio's `AsyncRead` / `AsyncWrite`. `read_frame` is cancel-safe: a read
//!   that loses a `select!` consumed nothing, and bytes already read stay in
//!   the codec.
//!
//! Readers and writers are separate so the two directions of one socket
//! can be owned by two threads or tasks.

use std::io::{self, Read, Write};

use crate::frame::{Codec, FrameError, Role};

/// Bytes asked for per read.
const READ_CHUNK: usize = 16 * 1024;

/// Why a framed read or write failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connection I/O failed")]
    Io(#[source] io::Error),
    #[error("invalid frame")]
    Frame(#[source] FrameError),
}

impl ConnError {
    /// The I/O error, if this is one.
    pub fn io(&self) -> Option<&io::Error> {
        match self {
            Self::Io(e) => Some(e),
            Self::Frame(_) => None,
        }
    }
}

/// Reads whole inbound messages of role `R` from a blocking stream.
pub struct FrameReader<R: Role, T> {
    io: T,
    codec: Codec<R>,
    buf: Vec<u8>,
}

impl<R: Role, T> std::fmt::Debug for FrameReader<R, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameReader")
            .field("buffered", &self.codec.buffered())
            .finish_non_exhaustive()
    }
}

impl<R: Role, T: Read> FrameReader<R, T> {
    pub fn new(io: T) -> Self {
        Self::with_codec(io, Codec::new())
    }

    /// `codec` holds bytes already read (those that followed a handshake).
    pub fn with_codec(io: T, codec: Codec<R>) -> Self {
        Self {
            io,
            codec,
            buf: vec![0; READ_CHUNK],
        }
    }

    /// The next message; `Ok(None)` at a clean EOF. An EOF inside a frame
    /// is [`FrameError::TruncatedAtEof`].
    pub fn read_frame(&mut self) -> Result<Option<R::Inbound>, ConnError> {
        loop {
            if let Some(msg) = self.codec.next_message().map_err(ConnError::Frame)? {
                return Ok(Some(msg));
            }
            let n = self.io.read(&mut self.buf).map_err(ConnError::Io)?;
            if n == 0 {
                self.codec.finish().map_err(ConnError::Frame)?;
                return Ok(None);
            }
            self.codec.feed(&self.buf[..n]).map_err(ConnError::Frame)?;
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.io
    }

    pub fn into_parts(self) -> (T, Codec<R>) {
        (self.io, self.codec)
    }
}

/// Writes whole outbound messages of role `R` to a blocking stream.
#[derive(Debug)]
pub struct FrameWriter<R: Role, T> {
    io: T,
    frame: Vec<u8>,
    _role: std::marker::PhantomData<fn() -> R>,
}

impl<R: Role, T: Write> FrameWriter<R, T> {
    pub fn new(io: T) -> Self {
        Self {
            io,
            frame: Vec::new(),
            _role: std::marker::PhantomData,
        }
    }

    /// Encodes `msg` and writes the whole frame. On an error the peer may
    /// have received part of it: the connection is then unusable.
    pub fn write_frame(&mut self, msg: &R::Outbound) -> Result<(), ConnError> {
        self.frame.clear();
        Codec::<R>::encode_into(msg, &mut self.frame).map_err(ConnError::Frame)?;
        self.io.write_all(&self.frame).map_err(ConnError::Io)?;
        self.io.flush().map_err(ConnError::Io)
    }

    pub fn get_ref(&self) -> &T {
        &self.io
    }
}

#[cfg(feature = "tokio")]
mod async_io {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    use super::{ConnError, READ_CHUNK};
    use crate::frame::{Codec, Role};

    /// Reads whole inbound messages of role `R` from a tokio stream.
    pub struct AsyncFrameReader<R: Role, T> {
        io: T,
        codec: Codec<R>,
        buf: Vec<u8>,
    }

    impl<R: Role, T> std::fmt::Debug for AsyncFrameReader<R, T> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("AsyncFrameReader")
                .field("buffered", &self.codec.buffered())
                .finish_non_exhaustive()
        }
    }

    impl<R: Role, T: AsyncRead + Unpin> AsyncFrameReader<R, T> {
        pub fn new(io: T) -> Self {
            Self::with_codec(io, Codec::new())
        }

        /// `codec` holds bytes already read (those that followed a hello).
        pub fn with_codec(io: T, codec: Codec<R>) -> Self {
            Self {
                io,
                codec,
                buf: vec![0; READ_CHUNK],
            }
        }

        /// The next message; `Ok(None)` at a clean EOF. Cancel-safe.
        pub async fn read_frame(&mut self) -> Result<Option<R::Inbound>, ConnError> {
            loop {
                if let Some(msg) = self.codec.next_message().map_err(ConnError::Frame)? {
                    return Ok(Some(msg));
                }
                let n = self.io.read(&mut self.buf).await.map_err(ConnError::Io)?;
                if n == 0 {
                    self.codec.finish().map_err(ConnError::Frame)?;
                    return Ok(None);
                }
                self.codec.feed(&self.buf[..n]).map_err(ConnError::Frame)?;
            }
        }

        /// A message already buffered, without reading: lets a caller
        /// batch its answers to every frame one read brought.
        pub fn buffered_frame(&mut self) -> Result<Option<R::Inbound>, ConnError> {
            self.codec.next_message().map_err(ConnError::Frame)
        }

        pub fn get_mut(&mut self) -> &mut T {
            &mut self.io
        }

        pub fn into_parts(self) -> (T, Codec<R>) {
            (self.io, self.codec)
        }
    }

    /// Writes whole outbound messages of role `R` to a tokio stream.
    #[derive(Debug)]
    pub struct AsyncFrameWriter<R: Role, T> {
        io: T,
        frame: Vec<u8>,
        _role: std::marker::PhantomData<fn() -> R>,
    }

    impl<R: Role, T: AsyncWrite + Unpin> AsyncFrameWriter<R, T> {
        pub fn new(io: T) -> Self {
            Self {
                io,
                frame: Vec::new(),
                _role: std::marker::PhantomData,
            }
        }

        /// Encodes `msg` and writes the whole frame. Not cancel-safe: a
        /// cancelled write may leave part of a frame on the stream.
        pub async fn write_frame(&mut self, msg: &R::Outbound) -> Result<(), ConnError> {
            self.frame.clear();
            Codec::<R>::encode_into(msg, &mut self.frame).map_err(ConnError::Frame)?;
            self.io.write_all(&self.frame).await.map_err(ConnError::Io)
        }

        pub fn get_mut(&mut self) -> &mut T {
            &mut self.io
        }

        pub fn into_inner(self) -> T {
            self.io
        }
    }
}

#[cfg(feature = "tokio")]
pub use async_io::{AsyncFrameReader, AsyncFrameWriter};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Guest, Host};
    use crate::guest::{GuestToHost, HostToGuest};

    /// A reader that hands out one byte per read.
    struct Trickle(std::io::Cursor<Vec<u8>>);
    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(1);
            self.0.read(&mut buf[..n])
        }
    }

    #[test]
    fn blocking_round_trip_byte_at_a_time() {
        let mut w = FrameWriter::<Guest, Vec<u8>>::new(Vec::new());
        for seq in 0..3 {
            w.write_frame(&GuestToHost::Pong { seq }).unwrap();
        }
        let bytes = w.get_ref().clone();
        let mut r = FrameReader::<Host, _>::new(Trickle(std::io::Cursor::new(bytes)));
        for seq in 0..3 {
            assert_eq!(r.read_frame().unwrap(), Some(GuestToHost::Pong { seq }));
        }
        assert_eq!(r.read_frame().unwrap(), None);
    }

    #[test]
    fn eof_inside_a_frame_is_an_error() {
        let frame = Codec::<Host>::encode(&HostToGuest::Shutdown).unwrap();
        let cut = frame[..frame.len() - 1].to_vec();
        let mut r = FrameReader::<Guest, _>::new(std::io::Cursor::new(cut));
        assert!(matches!(
            r.read_frame(),
            Err(ConnError::Frame(FrameError::TruncatedAtEof { .. }))
        ));
    }

    #[test]
    fn invalid_frame_is_typed() {
        let mut r = FrameReader::<Host, _>::new(std::io::Cursor::new(vec![0, 0, 0, 0]));
        assert!(matches!(
            r.read_frame(),
            Err(ConnError::Frame(FrameError::Empty))
        ));
    }

    #[cfg(feature = "tokio")]
    #[test]
    fn async_round_trip() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let (a, b) = tokio::io::duplex(64);
            let mut w = AsyncFrameWriter::<Guest, _>::new(a);
            let mut r = AsyncFrameReader::<Host, _>::new(b);
            let writer = async {
                for seq in 0..100 {
                    w.write_frame(&GuestToHost::Pong { seq }).await.unwrap();
                }
                drop(w);
            };
            let reader = async {
                for seq in 0..100 {
                    assert_eq!(
                        r.read_frame().await.unwrap(),
                        Some(GuestToHost::Pong { seq })
                    );
                }
                assert_eq!(r.read_frame().await.unwrap(), None);
            };
            tokio::join!(writer, reader);
        });
    }

    #[cfg(feature = "tokio")]
    #[test]
    fn buffered_frames_come_without_a_read() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut bytes = Vec::new();
            for seq in 0..3 {
                Codec::<Guest>::encode_into(&GuestToHost::Pong { seq }, &mut bytes).unwrap();
            }
            // One read brings all three; the stream then stays open and idle.
            let (mut a, b) = tokio::io::duplex(4096);
            tokio::io::AsyncWriteExt::write_all(&mut a, &bytes)
                .await
                .unwrap();
            let mut r = AsyncFrameReader::<Host, _>::new(b);
            assert_eq!(
                r.read_frame().await.unwrap(),
                Some(GuestToHost::Pong { seq: 0 })
            );
            assert_eq!(
                r.buffered_frame().unwrap(),
                Some(GuestToHost::Pong { seq: 1 })
            );
            assert_eq!(
                r.buffered_frame().unwrap(),
                Some(GuestToHost::Pong { seq: 2 })
            );
            assert_eq!(r.buffered_frame().unwrap(), None);
            drop(a);
        });
    }
}
