//! Decoding of the replication stream: the CopyData envelope (XLogData and
//! primary keepalives) and pgoutput's logical messages (protocol version 1).
//!
//! Decode only: turning a decoded insert into an outbox event happens in
//! `replication::mod`, with the column mapping.

use bytes::{Buf, Bytes};

/// A CopyData payload from the walsender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalMessage {
    /// WAL data: one pgoutput message.
    XLogData {
        /// LSN of the start of this data.
        wal_start: u64,
        /// Server's current end of WAL.
        wal_end: u64,
        /// The pgoutput message bytes.
        data: Bytes,
    },
    /// "Are you there?"; `reply` asks for an immediate status update.
    Keepalive {
        /// Server's current end of WAL (safe to confirm when nothing is pending).
        wal_end: u64,
        /// The server wants a reply now.
        reply: bool,
    },
}

/// A decoding failure: the stream is not what pgoutput v1 sends.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("cannot decode replication message: {0}")]
pub struct DecodeError(pub String);

fn need(buf: &Bytes, n: usize, what: &str) -> Result<(), DecodeError> {
    if buf.remaining() < n {
        Err(DecodeError(format!("{what}: needs {n} bytes, {} left", buf.remaining())))
    } else {
        Ok(())
    }
}

fn cstring(buf: &mut Bytes, what: &str) -> Result<String, DecodeError> {
    let end = buf.iter().position(|&b| b == 0).ok_or_else(|| DecodeError(format!("{what}: unterminated string")))?;
    let text = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.advance(end + 1);
    Ok(text)
}

impl WalMessage {
    /// Decodes one CopyData payload.
    pub fn parse(mut buf: Bytes) -> Result<WalMessage, DecodeError> {
        need(&buf, 1, "copy data")?;
        match buf.get_u8() {
            b'w' => {
                need(&buf, 24, "XLogData header")?;
                let wal_start = buf.get_u64();
                let wal_end = buf.get_u64();
                let _send_time = buf.get_i64();
                Ok(WalMessage::XLogData { wal_start, wal_end, data: buf })
            }
            b'k' => {
                need(&buf, 17, "keepalive")?;
                let wal_end = buf.get_u64();
                let _send_time = buf.get_i64();
                Ok(WalMessage::Keepalive { wal_end, reply: buf.get_u8() != 0 })
            }
            other => Err(DecodeError(format!("unknown copy data type {:?}", other as char))),
        }
    }
}

/// One column of a relation, as the Relation message describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
}

/// One value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A TOASTed value that did not change (updates only).
    UnchangedToast,
    /// Text representation.
    Text(Bytes),
}

/// A pgoutput message (protocol version 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Logical {
    /// Transaction start.
    Begin {
        /// LSN of the commit record.
        final_lsn: u64,
        /// Commit time, microseconds since 2000-01-01.
        commit_time: i64,
        /// Transaction id.
        xid: u32,
    },
    /// Transaction end: everything up to `end_lsn` is decoded.
    Commit {
        /// LSN of the commit record.
        commit_lsn: u64,
        /// LSN just after it: what to confirm once the transaction is published.
        end_lsn: u64,
        /// Commit time, microseconds since 2000-01-01.
        commit_time: i64,
    },
    /// Replication origin of the transaction.
    Origin,
    /// Schema of a relation (sent before its first change and after ALTER TABLE).
    Relation {
        /// Relation OID.
        oid: u32,
        /// Schema name.
        namespace: String,
        /// Table name.
        name: String,
        /// Columns in tuple order.
        columns: Vec<Column>,
    },
    /// A type description (ignored).
    Type,
    /// A new row.
    Insert {
        /// Relation OID.
        oid: u32,
        /// Column values in the relation's order.
        values: Vec<Value>,
    },
    /// An update, delete or truncate: not outbox events.
    OtherChange,
    /// `pg_logical_emit_message`.
    Message {
        /// Emitted inside a transaction (delivered at its commit).
        transactional: bool,
        /// LSN of the message.
        lsn: u64,
        /// Prefix the application chose.
        prefix: String,
        /// Content bytes.
        content: Bytes,
    },
}

impl Logical {
    /// Decodes one pgoutput message.
    pub fn parse(mut buf: Bytes) -> Result<Logical, DecodeError> {
        need(&buf, 1, "pgoutput message")?;
        match buf.get_u8() {
            b'B' => {
                need(&buf, 20, "Begin")?;
                Ok(Logical::Begin { final_lsn: buf.get_u64(), commit_time: buf.get_i64(), xid: buf.get_u32() })
            }
            b'C' => {
                need(&buf, 25, "Commit")?;
                let _flags = buf.get_u8();
                Ok(Logical::Commit { commit_lsn: buf.get_u64(), end_lsn: buf.get_u64(), commit_time: buf.get_i64() })
            }
            b'O' => Ok(Logical::Origin),
            b'Y' => Ok(Logical::Type),
            b'R' => {
                need(&buf, 4, "Relation")?;
                let oid = buf.get_u32();
                let namespace = cstring(&mut buf, "Relation namespace")?;
                let name = cstring(&mut buf, "Relation name")?;
                need(&buf, 3, "Relation")?;
                let _replica_identity = buf.get_u8();
                let count = buf.get_u16() as usize;
                let mut columns = Vec::with_capacity(count);
                for _ in 0..count {
                    need(&buf, 1, "Relation column")?;
                    let _flags = buf.get_u8();
                    let name = cstring(&mut buf, "column name")?;
                    need(&buf, 8, "Relation column")?;
                    let type_oid = buf.get_u32();
                    let _typmod = buf.get_i32();
                    columns.push(Column { name, type_oid });
                }
                Ok(Logical::Relation { oid, namespace, name, columns })
            }
            b'I' => {
                need(&buf, 5, "Insert")?;
                let oid = buf.get_u32();
                let marker = buf.get_u8();
                if marker != b'N' {
                    return Err(DecodeError(format!("Insert: expected 'N', got {:?}", marker as char)));
                }
                Ok(Logical::Insert { oid, values: tuple(&mut buf)? })
            }
            b'U' | b'D' | b'T' => Ok(Logical::OtherChange),
            b'M' => {
                need(&buf, 9, "Message")?;
                let transactional = buf.get_u8() & 1 == 1;
                let lsn = buf.get_u64();
                let prefix = cstring(&mut buf, "Message prefix")?;
                need(&buf, 4, "Message length")?;
                let len = buf.get_u32() as usize;
                need(&buf, len, "Message content")?;
                Ok(Logical::Message { transactional, lsn, prefix, content: buf.split_to(len) })
            }
            other => Err(DecodeError(format!("unknown pgoutput message {:?}", other as char))),
        }
    }
}

fn tuple(buf: &mut Bytes) -> Result<Vec<Value>, DecodeError> {
    need(buf, 2, "TupleData")?;
    let count = buf.get_u16() as usize;
    let mut values = Vec::with_capacity(count);
    for _ in 0..count {
        need(buf, 1, "TupleData column")?;
        values.push(match buf.get_u8() {
            b'n' => Value::Null,
            b'u' => Value::UnchangedToast,
            b't' | b'b' => {
                need(buf, 4, "TupleData length")?;
                let len = buf.get_u32() as usize;
                need(buf, len, "TupleData value")?;
                Value::Text(buf.split_to(len))
            }
            other => return Err(DecodeError(format!("TupleData: unknown kind {:?}", other as char))),
        });
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};

    #[test]
    fn keepalive_and_xlogdata_envelopes() {
        let mut k = BytesMut::new();
        k.put_u8(b'k');
        k.put_u64(0x1_0000_0010);
        k.put_i64(0);
        k.put_u8(1);
        assert_eq!(
            WalMessage::parse(k.freeze()).unwrap(),
            WalMessage::Keepalive { wal_end: 0x1_0000_0010, reply: true }
        );
        let mut w = BytesMut::new();
        w.put_u8(b'w');
        w.put_u64(5);
        w.put_u64(9);
        w.put_i64(0);
        w.put_slice(b"B...");
        let WalMessage::XLogData { wal_start, wal_end, data } = WalMessage::parse(w.freeze()).unwrap() else {
            panic!()
        };
        assert_eq!((wal_start, wal_end, &data[..]), (5, 9, &b"B..."[..]));
    }

    /// Hand-assembled in the layout the protocol documentation gives for:
    /// `CREATE TABLE t (id int8, note text)` then `INSERT INTO t VALUES (7, NULL)`.
    #[test]
    fn relation_and_insert_from_captured_bytes() {
        let relation = b"R\x00\x00\x40\x01public\x00t\x00d\x00\x02\x01id\x00\x00\x00\x00\x14\xff\xff\xff\xff\x00note\x00\x00\x00\x00\x19\xff\xff\xff\xff";
        let Logical::Relation { oid, namespace, name, columns } = Logical::parse(Bytes::from_static(relation)).unwrap()
        else {
            panic!("not a relation")
        };
        assert_eq!((oid, namespace.as_str(), name.as_str()), (0x4001, "public", "t"));
        assert_eq!(
            columns,
            vec![Column { name: "id".into(), type_oid: 20 }, Column { name: "note".into(), type_oid: 25 }]
        );
        let insert = b"I\x00\x00\x40\x01N\x00\x02t\x00\x00\x00\x017n";
        assert_eq!(
            Logical::parse(Bytes::from_static(insert)).unwrap(),
            Logical::Insert { oid: 0x4001, values: vec![Value::Text(Bytes::from_static(b"7")), Value::Null] }
        );
    }

    #[test]
    fn begin_commit_and_message() {
        let mut b = BytesMut::new();
        b.put_u8(b'B');
        b.put_u64(100);
        b.put_i64(42);
        b.put_u32(7);
        assert_eq!(Logical::parse(b.freeze()).unwrap(), Logical::Begin { final_lsn: 100, commit_time: 42, xid: 7 });
        let mut c = BytesMut::new();
        c.put_u8(b'C');
        c.put_u8(0);
        c.put_u64(100);
        c.put_u64(120);
        c.put_i64(42);
        assert_eq!(
            Logical::parse(c.freeze()).unwrap(),
            Logical::Commit { commit_lsn: 100, end_lsn: 120, commit_time: 42 }
        );
        let mut m = BytesMut::new();
        m.put_u8(b'M');
        m.put_u8(1);
        m.put_u64(99);
        m.put_slice(b"outbox\0");
        m.put_u32(2);
        m.put_slice(b"{}");
        assert_eq!(
            Logical::parse(m.freeze()).unwrap(),
            Logical::Message {
                transactional: true,
                lsn: 99,
                prefix: "outbox".into(),
                content: Bytes::from_static(b"{}")
            }
        );
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        for bytes in [
            &b"I\x00\x00"[..],
            b"R\x00\x00\x00\x01ns",
            b"M\x01",
            b"w\x00",
            b"I\x00\x00\x40\x01N\x00\x01t\x00\x00\x00\x09ab",
        ] {
            assert!(
                Logical::parse(Bytes::copy_from_slice(bytes)).is_err()
                    || WalMessage::parse(Bytes::copy_from_slice(bytes)).is_err()
            );
        }
    }
}
