//! The PostgreSQL wire protocol, as far as the proxy reads it: the
//! untyped packets that open a connection, the framing of the client's
//! messages, the statements its Parse, Bind, Execute and Query messages
//! run, and the server's ReadyForQuery messages. Pure: bytes in, facts
//! out; the connections feed it what they read.

use std::collections::HashMap;

/// The request codes of the untyped packets a client may send first.
pub(super) const SSL_REQUEST: u32 = 80_877_103;
pub(super) const GSSENC_REQUEST: u32 = 80_877_104;
pub(super) const CANCEL_REQUEST: u32 = 80_877_102;
/// libpq's limit on a startup packet.
pub(super) const MAX_STARTUP_LEN: usize = 10_000;
/// The Terminate message.
pub(super) const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];

/// The value of `name` among a startup message's parameters (pairs of
/// NUL-terminated strings after the length and protocol version).
pub(super) fn startup_parameter(startup: &[u8], name: &str) -> Option<String> {
    let mut rest = startup.get(8..)?;
    while let Some((key, after_key)) = c_string(rest) {
        if key.is_empty() {
            return None;
        }
        let (value, after_value) = c_string(after_key)?;
        if key == name {
            return Some(value);
        }
        rest = after_value;
    }
    None
}

/// One unit of the client's byte stream.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Frame {
    /// A whole message: type byte, length, body.
    Message { tag: u8, bytes: Vec<u8> },
    /// Bytes forwarded without looking (after a cancel request, or once
    /// the stream stopped making sense).
    Opaque(Vec<u8>),
}

/// Splits the client's stream (after the startup packet) into messages.
#[derive(Debug, Default)]
pub(super) struct Framer {
    pub(super) buffer: Vec<u8>,
    pub(super) opaque: bool,
}

impl Framer {
    pub(super) fn push(&mut self, data: &[u8]) {
        self.buffer.extend_from_slice(data);
    }

    pub(super) fn next(&mut self) -> Option<Frame> {
        if self.buffer.is_empty() {
            return None;
        }
        if self.opaque {
            return Some(Frame::Opaque(std::mem::take(&mut self.buffer)));
        }
        if self.buffer.len() < 5 {
            return None;
        }
        let len = u32::from_be_bytes([
            self.buffer[1],
            self.buffer[2],
            self.buffer[3],
            self.buffer[4],
        ]) as usize;
        if len < 4 {
            self.opaque = true;
            return self.next();
        }
        let total = len + 1;
        if self.buffer.len() < total {
            return None;
        }
        let bytes: Vec<u8> = self.buffer.drain(..total).collect();
        Some(Frame::Message {
            tag: bytes[0],
            bytes,
        })
    }
}

/// Counts the server's ReadyForQuery messages without buffering its stream.
#[derive(Debug, Default)]
pub(super) struct ReadyCounter {
    header: [u8; 5],
    header_len: usize,
    /// Body bytes of the current message still to skip.
    remaining: usize,
    pub(super) ready: u64,
}

impl ReadyCounter {
    pub(super) fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining > 0 {
                let skip = self.remaining.min(data.len());
                self.remaining -= skip;
                data = &data[skip..];
                continue;
            }
            let take = (5 - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&data[..take]);
            self.header_len += take;
            data = &data[take..];
            if self.header_len == 5 {
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                if self.header[0] == b'Z' {
                    self.ready += 1;
                }
                self.remaining = len.saturating_sub(4);
                self.header_len = 0;
            }
        }
    }
}

/// The SQL behind prepared statements and portals, to know what an
/// Execute runs.
#[derive(Debug, Default)]
pub(super) struct Statements {
    prepared: HashMap<String, String>,
    portals: HashMap<String, Executed>,
}

/// A statement being run: its SQL text if known, and its parameters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Executed {
    pub(super) sql: Option<String>,
    pub(super) params: Vec<Option<Vec<u8>>>,
}

/// The parameter values of a Bind message's body after the portal and
/// statement names: format codes, then each value (length -1 is NULL).
pub(super) fn bind_parameters(mut data: &[u8]) -> Option<Vec<Option<Vec<u8>>>> {
    fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (data.get(..n)?, data.get(n..)?);
        *data = tail;
        Some(head)
    }
    let formats = u16::from_be_bytes(take(&mut data, 2)?.try_into().ok()?);
    take(&mut data, 2 * usize::from(formats))?;
    let count = u16::from_be_bytes(take(&mut data, 2)?.try_into().ok()?);
    let mut params = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let len = i32::from_be_bytes(take(&mut data, 4)?.try_into().ok()?);
        params.push(match usize::try_from(len) {
            Ok(len) => Some(take(&mut data, len)?.to_vec()),
            Err(_) => None,
        });
    }
    Some(params)
}

impl Statements {
    /// Records what a message defines. For a message that runs a statement
    /// (Query, Execute), returns `Some` with its SQL text (if known) and
    /// parameters.
    pub(super) fn observe(&mut self, tag: u8, body: &[u8]) -> Option<Executed> {
        match tag {
            b'P' => {
                if let Some((name, rest)) = c_string(body)
                    && let Some((query, _)) = c_string(rest)
                {
                    self.prepared.insert(name, query);
                }
                None
            }
            b'B' => {
                if let Some((portal, rest)) = c_string(body) {
                    let named = c_string(rest);
                    let sql = named
                        .as_ref()
                        .and_then(|(name, _)| self.prepared.get(name).cloned());
                    let params = named
                        .and_then(|(_, rest)| bind_parameters(rest))
                        .unwrap_or_default();
                    self.portals.insert(portal, Executed { sql, params });
                }
                None
            }
            b'C' => {
                if let Some((&kind, rest)) = body.split_first()
                    && let Some((name, _)) = c_string(rest)
                {
                    match kind {
                        b'S' => {
                            self.prepared.remove(&name);
                        }
                        b'P' => {
                            self.portals.remove(&name);
                        }
                        _ => {}
                    }
                }
                None
            }
            b'Q' => Some(Executed {
                sql: c_string(body).map(|(query, _)| query),
                params: Vec::new(),
            }),
            b'E' => Some(
                c_string(body)
                    .and_then(|(portal, _)| self.portals.get(&portal).cloned())
                    .unwrap_or_default(),
            ),
            _ => None,
        }
    }
}

/// A NUL-terminated string and what follows it.
pub(super) fn c_string(data: &[u8]) -> Option<(String, &[u8])> {
    let end = data.iter().position(|&byte| byte == 0)?;
    Some((
        String::from_utf8_lossy(&data[..end]).into_owned(),
        &data[end + 1..],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut bytes = vec![tag];
        bytes.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        bytes.extend_from_slice(body);
        bytes
    }

    #[test]
    fn the_framer_splits_messages_across_reads() {
        let parse = message(b'P', b"s1\0INSERT INTO t VALUES (1)\0\0\0");
        let sync = message(b'S', b"");
        let stream: Vec<u8> = [parse.clone(), sync.clone()].concat();
        let mut framer = Framer::default();
        framer.push(&stream[..3]);
        assert_eq!(framer.next(), None, "a header is not a message");
        framer.push(&stream[3..parse.len() + 2]);
        assert_eq!(
            framer.next(),
            Some(Frame::Message {
                tag: b'P',
                bytes: parse
            })
        );
        assert_eq!(framer.next(), None);
        framer.push(&stream[stream.len() - 3..]);
        assert_eq!(
            framer.next(),
            Some(Frame::Message {
                tag: b'S',
                bytes: sync
            })
        );
    }

    #[test]
    fn a_nonsense_length_makes_the_stream_opaque() {
        let mut framer = Framer::default();
        framer.push(&[b'Q', 0, 0, 0, 1, 42]);
        assert_eq!(
            framer.next(),
            Some(Frame::Opaque(vec![b'Q', 0, 0, 0, 1, 42]))
        );
        framer.push(b"more");
        assert_eq!(framer.next(), Some(Frame::Opaque(b"more".to_vec())));
    }

    #[test]
    fn ready_for_query_is_counted_across_chunks() {
        let stream: Vec<u8> = [
            message(b'C', b"INSERT 0 1\0"),
            message(b'Z', b"I"),
            message(b'D', b"ZZZZZZ"),
            message(b'Z', b"T"),
        ]
        .concat();
        for chunk in [1, 2, 3, 7, stream.len()] {
            let mut counter = ReadyCounter::default();
            for piece in stream.chunks(chunk) {
                counter.feed(piece);
            }
            assert_eq!(counter.ready, 2, "chunks of {chunk}");
        }
    }

    fn sql(executed: Option<Executed>) -> Option<Option<String>> {
        executed.map(|e| e.sql)
    }

    #[test]
    fn an_execute_is_traced_to_its_parse() {
        let mut statements = Statements::default();
        assert_eq!(statements.observe(b'P', b"s7\0COMMIT\0\0\0"), None);
        assert_eq!(statements.observe(b'B', b"\0s7\0\0\0\0\0\0\0"), None);
        assert_eq!(
            sql(statements.observe(b'E', b"\0\0\0\0\0")),
            Some(Some("COMMIT".to_owned()))
        );
        assert_eq!(statements.observe(b'C', b"Ss7\0"), None);
        assert_eq!(
            sql(statements.observe(b'Q', b"select 1\0")),
            Some(Some("select 1".to_owned()))
        );
        assert_eq!(
            sql(statements.observe(b'E', b"unknown\0\0\0\0\0")),
            Some(None)
        );
    }

    #[test]
    fn an_execute_carries_its_portal_parameters() {
        let mut statements = Statements::default();
        statements.observe(b'P', b"s1\0INSERT INTO t VALUES ($1, $2, $3)\0\0\0");
        // Portal "p", statement "s1", one format code (binary), three
        // parameters: 4 bytes, NULL, 2 bytes; then the result formats.
        let mut bind = b"p\0s1\0".to_vec();
        bind.extend_from_slice(&[0, 1, 0, 1, 0, 3]);
        bind.extend_from_slice(&[0, 0, 0, 4, 1, 2, 3, 4]);
        bind.extend_from_slice(&(-1_i32).to_be_bytes());
        bind.extend_from_slice(&[0, 0, 0, 2, 9, 9]);
        bind.extend_from_slice(&[0, 0]);
        assert_eq!(statements.observe(b'B', &bind), None);
        let executed = statements.observe(b'E', b"p\0\0\0\0\0").expect("runs");
        assert_eq!(
            executed.sql.as_deref(),
            Some("INSERT INTO t VALUES ($1, $2, $3)")
        );
        assert_eq!(
            executed.params,
            vec![Some(vec![1, 2, 3, 4]), None, Some(vec![9, 9])]
        );
        // A truncated Bind gives no parameters rather than garbage.
        assert_eq!(bind_parameters(&[0, 0, 0, 1, 0, 0, 0, 9, 1]), None);
    }

    #[test]
    fn the_application_name_is_read_from_the_startup_message() {
        let mut startup = vec![0, 0, 0, 0, 0, 3, 0, 0];
        startup.extend_from_slice(b"user\0postgres\0application_name\0worker-1\0\0");
        assert_eq!(
            startup_parameter(&startup, "application_name").as_deref(),
            Some("worker-1")
        );
        assert_eq!(startup_parameter(&startup, "database"), None);
    }

    /// A Bind of portal `portal` to statement `statement`, binary, with
    /// `params` (`None`: NULL) and no result formats.
    fn bind(portal: &str, statement: &str, params: &[Option<&[u8]>]) -> Vec<u8> {
        let mut body = format!("{portal}\0{statement}\0").into_bytes();
        body.extend_from_slice(&[0, 1, 0, 1]);
        body.extend_from_slice(&u16::try_from(params.len()).unwrap().to_be_bytes());
        for param in params {
            match param {
                Some(bytes) => {
                    body.extend_from_slice(&i32::try_from(bytes.len()).unwrap().to_be_bytes());
                    body.extend_from_slice(bytes);
                }
                None => body.extend_from_slice(&(-1_i32).to_be_bytes()),
            }
        }
        body.extend_from_slice(&[0, 0]);
        message(b'B', &body)
    }

    /// What the client's `stream`, read `chunk` bytes at a time, runs.
    fn executed_in(stream: &[u8], chunk: usize) -> Vec<Executed> {
        let (mut framer, mut statements, mut executed) =
            (Framer::default(), Statements::default(), Vec::new());
        for piece in stream.chunks(chunk) {
            framer.push(piece);
            while let Some(frame) = framer.next() {
                let Frame::Message { tag, bytes } = frame else {
                    panic!("the stream stopped making sense at chunks of {chunk}");
                };
                executed.extend(statements.observe(tag, &bytes[5..]));
            }
        }
        executed
    }

    #[test]
    fn an_extended_protocol_batch_split_anywhere_runs_one_statement_with_its_parameters() {
        // What tokio-postgres sends for one parameterised statement:
        // Parse, Bind, Describe, Execute, Sync, in one batch.
        let stream = [
            message(b'P', b"s3\0UPDATE t SET a = $1 WHERE id = $2\0\0\0"),
            bind("", "s3", &[Some(&[7; 16]), None]),
            message(b'D', b"P\0"),
            message(b'E', b"\0\0\0\0\0"),
            message(b'S', b""),
        ]
        .concat();
        for chunk in 1..=stream.len() {
            assert_eq!(
                executed_in(&stream, chunk),
                vec![Executed {
                    sql: Some("UPDATE t SET a = $1 WHERE id = $2".to_owned()),
                    params: vec![Some(vec![7; 16]), None],
                }],
                "chunks of {chunk}"
            );
        }
    }

    #[test]
    fn simple_queries_split_anywhere_run_their_text_in_order() {
        let stream = [
            message(b'Q', b"BEGIN\0"),
            message(b'Q', b"INSERT INTO t VALUES (1)\0"),
            message(b'Q', b"COMMIT\0"),
        ]
        .concat();
        for chunk in 1..=stream.len() {
            let sql: Vec<_> = executed_in(&stream, chunk)
                .into_iter()
                .map(|e| (e.sql, e.params))
                .collect();
            assert_eq!(
                sql,
                ["BEGIN", "INSERT INTO t VALUES (1)", "COMMIT"]
                    .map(|q| (Some(q.to_owned()), Vec::new()))
                    .to_vec(),
                "chunks of {chunk}"
            );
        }
    }

    #[test]
    fn a_reparsed_statement_runs_its_new_text_and_a_closed_portal_is_unknown() {
        let stream = [
            message(b'P', b"s1\0SELECT 1\0\0\0"),
            message(b'C', b"Ss1\0"),
            message(b'P', b"s1\0SELECT 2\0\0\0"),
            bind("p", "s1", &[]),
            message(b'E', b"p\0\0\0\0\0"),
            message(b'C', b"Pp\0"),
            message(b'E', b"p\0\0\0\0\0"),
            message(b'S', b""),
        ]
        .concat();
        let executed = executed_in(&stream, stream.len());
        assert_eq!(
            executed
                .iter()
                .map(|e| e.sql.as_deref())
                .collect::<Vec<_>>(),
            [Some("SELECT 2"), None]
        );
    }

    #[test]
    fn messages_that_run_nothing_are_not_statements() {
        let mut statements = Statements::default();
        for (tag, body) in [
            (b'S', &b""[..]),
            (b'H', b""),
            (b'D', b"S\0"),
            (b'd', b"copy data"),
        ] {
            assert_eq!(statements.observe(tag, body), None, "{}", tag as char);
        }
    }
}
