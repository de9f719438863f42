//! Our side of AutoNAT v2 as a client (libp2p's specification, `autonat-v2.md`): ask a
//! server to dial one of our addresses back, hand its nonce back to it when it does. What
//! to ask, of whom, and what the answers prove is mycel-core's `autonat`; libp2p's own
//! server answers other nodes.
//!
//! Messages are protobuf, each framed by its length as an unsigned varint. The request
//! stream carries `Message`s; the dial-back stream one `DialBack` and one `DialBackResponse`.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::{Multiaddr, StreamProtocol};
use mycel_core::autonat::Answer;

/// The protocol a client asks on.
pub(crate) const DIAL_REQUEST_PROTOCOL: StreamProtocol =
    StreamProtocol::new("/libp2p/autonat/2/dial-request");
/// The protocol a server dials back on.
pub(crate) const DIAL_BACK_PROTOCOL: StreamProtocol =
    StreamProtocol::new("/libp2p/autonat/2/dial-back");

/// The largest request-stream message read (a data request or a response is far smaller).
const MAX_MESSAGE: usize = 4_200;
/// The largest dial-back message read.
const MAX_DIAL_BACK: usize = 16;
/// Bytes one data message carries at most (the specification's bound).
const DATA_CHUNK: usize = 4_096;
/// The most data a server may ask for before it dials (the specification asks 30-100 kB
/// of a client whose address differs from the one the server sees).
const MAX_DATA: u64 = 100_000;

/// Response and dial statuses (`DialResponse.ResponseStatus`, `DialStatus`).
const STATUS_OK: i32 = 200;
const DIAL_ERROR: i32 = 100;

#[derive(Clone, PartialEq, prost::Message)]
struct Message {
    #[prost(oneof = "Msg", tags = "1, 2, 3, 4")]
    msg: Option<Msg>,
}

/// The specification's names.
#[allow(clippy::enum_variant_names)]
#[derive(Clone, PartialEq, prost::Oneof)]
enum Msg {
    #[prost(message, tag = "1")]
    DialRequest(DialRequest),
    #[prost(message, tag = "2")]
    DialResponse(DialResponse),
    #[prost(message, tag = "3")]
    DialDataRequest(DialDataRequest),
    #[prost(message, tag = "4")]
    DialDataResponse(DialDataResponse),
}

#[derive(Clone, PartialEq, prost::Message)]
struct DialRequest {
    #[prost(bytes = "vec", repeated, tag = "1")]
    addrs: Vec<Vec<u8>>,
    #[prost(fixed64, tag = "2")]
    nonce: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct DialDataRequest {
    #[prost(uint32, tag = "1")]
    addr_idx: u32,
    #[prost(uint64, tag = "2")]
    num_bytes: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct DialResponse {
    #[prost(int32, tag = "1")]
    status: i32,
    #[prost(uint32, tag = "2")]
    addr_idx: u32,
    #[prost(int32, tag = "3")]
    dial_status: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct DialDataResponse {
    #[prost(bytes = "vec", tag = "1")]
    data: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct DialBack {
    #[prost(fixed64, tag = "1")]
    nonce: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct DialBackResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// Writes `message` with its length in front.
async fn send<M: prost::Message>(
    io: &mut (impl AsyncWrite + Unpin),
    message: &M,
) -> io::Result<()> {
    io.write_all(&message.encode_length_delimited_to_vec())
        .await?;
    io.flush().await
}

/// Reads one length-framed message of at most `max` bytes.
async fn receive<M: prost::Message + Default>(
    io: &mut (impl AsyncRead + Unpin),
    max: usize,
) -> io::Result<M> {
    let mut len: u64 = 0;
    for i in 0.. {
        if i == 10 {
            return Err(invalid("length prefix too long"));
        }
        let mut byte = [0u8];
        io.read_exact(&mut byte).await?;
        len |= u64::from(byte[0] & 0x7f) << (7 * i);
        if byte[0] & 0x80 == 0 {
            break;
        }
    }
    if len > max as u64 {
        return Err(invalid("message too large"));
    }
    let mut buf = vec![0u8; len as usize];
    io.read_exact(&mut buf).await?;
    M::decode(buf.as_slice()).map_err(|_| invalid("undecodable message"))
}

/// Asks the server at the other end of `stream` to dial `addr` back with `nonce`, and
/// returns its verdict. The dial-back itself arrives on another stream ([`answer_dial_back`]);
/// only that proves anything.
pub(crate) async fn ask(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    addr: &Multiaddr,
    nonce: u64,
) -> io::Result<Answer> {
    let request = Message {
        msg: Some(Msg::DialRequest(DialRequest {
            addrs: vec![addr.to_vec()],
            nonce,
        })),
    };
    send(&mut stream, &request).await?;
    let mut data_sent = false;
    loop {
        let message: Message = receive(&mut stream, MAX_MESSAGE).await?;
        match message.msg {
            // Before dialling an address other than the one it sees us at, a server asks for
            // data to make an amplification cost us too; once, and within the bound.
            Some(Msg::DialDataRequest(request)) if !data_sent => {
                if request.addr_idx != 0 || request.num_bytes > MAX_DATA {
                    return Ok(Answer::Inconclusive);
                }
                let mut left = request.num_bytes as usize;
                while left > 0 {
                    let n = left.min(DATA_CHUNK);
                    let data = Message {
                        msg: Some(Msg::DialDataResponse(DialDataResponse { data: vec![0; n] })),
                    };
                    send(&mut stream, &data).await?;
                    left -= n;
                }
                data_sent = true;
            }
            Some(Msg::DialResponse(response)) => {
                let _ = stream.close().await;
                return Ok(verdict(&response));
            }
            _ => return Err(invalid("unexpected message on the dial-request stream")),
        }
    }
}

/// What a server's response says: reachable, not reachable (it could not connect), or
/// nothing (it refused, failed inside, or connected but the dial-back stream broke, which
/// may be our side's doing).
fn verdict(response: &DialResponse) -> Answer {
    if response.status != STATUS_OK || response.addr_idx != 0 {
        return Answer::Inconclusive;
    }
    match response.dial_status {
        STATUS_OK => Answer::Reachable,
        DIAL_ERROR => Answer::Unreachable,
        _ => Answer::Inconclusive,
    }
}

/// Answers a server's dial-back: reads its nonce and acknowledges it.
pub(crate) async fn answer_dial_back(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
) -> io::Result<u64> {
    let DialBack { nonce } = receive(&mut stream, MAX_DIAL_BACK).await?;
    send(&mut stream, &DialBackResponse { status: 0 }).await?;
    let _ = stream.close().await;
    Ok(nonce)
}

#[cfg(test)]
mod tests {
    use futures::io::Cursor;
    use prost::Message as _;

    use super::*;

    #[test]
    fn messages_are_encoded_as_the_specification_says() {
        // Message { dialRequest (1, length-delimited) { addrs (1): [0x04 0x7f 0 0 1],
        // nonce (2, fixed64): 1 } }, framed by its length.
        let request = Message {
            msg: Some(Msg::DialRequest(DialRequest {
                addrs: vec![vec![0x04, 0x7f, 0, 0, 1]],
                nonce: 1,
            })),
        };
        assert_eq!(
            request.encode_length_delimited_to_vec(),
            [18, 0x0a, 16, 0x0a, 5, 0x04, 0x7f, 0, 0, 1, 0x11, 1, 0, 0, 0, 0, 0, 0, 0]
        );
        // DialBack { nonce (1, fixed64) }.
        assert_eq!(
            DialBack { nonce: 2 }.encode_length_delimited_to_vec(),
            [9, 0x09, 2, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    /// A server's side of one exchange, scripted: the bytes it sends, in order.
    fn server_says(messages: &[Message]) -> Vec<u8> {
        messages
            .iter()
            .flat_map(|m| m.encode_length_delimited_to_vec())
            .collect()
    }

    /// A stream that reads `input` and records what is written.
    struct Duplex {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl AsyncRead for Duplex {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<io::Result<usize>> {
            std::pin::Pin::new(&mut self.input).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Duplex {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            self.output.extend_from_slice(buf);
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_close(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    fn duplex(input: Vec<u8>) -> Duplex {
        Duplex {
            input: Cursor::new(input),
            output: Vec::new(),
        }
    }

    fn response(status: i32, dial_status: i32) -> Message {
        Message {
            msg: Some(Msg::DialResponse(DialResponse {
                status,
                addr_idx: 0,
                dial_status,
            })),
        }
    }

    #[test]
    fn verdicts_data_requests_and_bad_servers() {
        let addr: Multiaddr = "/ip4/198.51.100.1/tcp/4001".parse().unwrap();
        let run = |input: Vec<u8>| {
            let mut io = duplex(input);
            let answer = futures::executor::block_on(ask(&mut io, &addr, 7));
            (answer, io.output)
        };
        let (answer, sent) = run(server_says(&[response(200, 200)]));
        assert_eq!(answer.unwrap(), Answer::Reachable);
        let asked: Message = Message::decode_length_delimited(sent.as_slice()).unwrap();
        assert_eq!(
            asked.msg,
            Some(Msg::DialRequest(DialRequest {
                addrs: vec![addr.to_vec()],
                nonce: 7
            }))
        );
        assert_eq!(
            run(server_says(&[response(200, 100)])).0.unwrap(),
            Answer::Unreachable
        );
        // Connected, but the dial-back stream broke: no verdict. Refused: no verdict.
        assert_eq!(
            run(server_says(&[response(200, 101)])).0.unwrap(),
            Answer::Inconclusive
        );
        assert_eq!(
            run(server_says(&[response(101, 0)])).0.unwrap(),
            Answer::Inconclusive
        );
        // Data asked for: sent in chunks of at most 4096 bytes, then the verdict.
        let data = |n| Message {
            msg: Some(Msg::DialDataRequest(DialDataRequest {
                addr_idx: 0,
                num_bytes: n,
            })),
        };
        let (answer, sent) = run(server_says(&[data(10_000), response(200, 200)]));
        assert_eq!(answer.unwrap(), Answer::Reachable);
        let mut rest = sent.as_slice();
        let mut chunks = Vec::new();
        while !rest.is_empty() {
            let m = Message::decode_length_delimited(&mut rest).unwrap();
            if let Some(Msg::DialDataResponse(d)) = m.msg {
                chunks.push(d.data.len());
            }
        }
        assert_eq!(chunks, vec![4096, 4096, 1808]);
        // Too much data, a second data request, garbage or nothing: refused, or an error.
        assert_eq!(
            run(server_says(&[data(1 << 30)])).0.unwrap(),
            Answer::Inconclusive
        );
        assert!(run(server_says(&[data(10), data(10)])).0.is_err());
        assert!(run(vec![0xff; 12]).0.is_err());
        assert!(run(vec![0x80, 0x80, 0x80, 0x01]).0.is_err(), "too large");
        assert!(run(Vec::new()).0.is_err());
    }

    #[test]
    fn a_dial_back_is_acknowledged() {
        let mut io = duplex(DialBack { nonce: 42 }.encode_length_delimited_to_vec());
        let nonce = futures::executor::block_on(answer_dial_back(&mut io)).unwrap();
        assert_eq!(nonce, 42);
        let ack = DialBackResponse::decode_length_delimited(io.output.as_slice()).unwrap();
        assert_eq!(ack.status, 0);
        let mut garbage = duplex(vec![3, 0xff, 0xff, 0xff]);
        assert!(futures::executor::block_on(answer_dial_back(&mut garbage)).is_err());
    }
}
