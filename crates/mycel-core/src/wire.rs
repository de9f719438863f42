//! Size-bounded CBOR encoding for every control message.
//!
//! A decoder that trusts a length prefix from a peer can be made to allocate without bound, so
//! every decode here first checks the input length against a caller-supplied maximum. Inside
//! the input, an array or map header may still claim any number of elements: serde's
//! collection visitors reserve up to 1 MiB for what such a header claims, whatever the size of
//! the message (a 20-byte statement could make its receiver reserve a megabyte). [`decode`]
//! therefore hands the visitors a size hint of at most [`MAX_PREALLOC_ELEMENTS`]; collections
//! grow past it only as their elements actually arrive, so the allocation of a decode is
//! bounded by the size of its input (times how much larger in memory than on the wire a
//! decoded value can be), and nesting deeper than [`MAX_DEPTH`] is refused. The property
//! tests in `tests/decoders.rs` hold every decoder of peers' bytes to this.

use serde::{de::DeserializeOwned, Serialize};

/// Why a message from a peer was refused. Each reason is a label of the rejection counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Rejection {
    /// The message is larger than the protocol allows.
    #[error("message exceeds the size limit")]
    Oversized,
    /// The bytes do not decode as the expected message.
    #[error("message does not decode")]
    Malformed,
    /// The signature does not verify, or the signer is not the claimed issuer.
    #[error("signature does not verify for the claimed issuer")]
    BadSignature,
    /// A statement older than (or as old as) one already accepted from the same issuer.
    #[error("sequence number is not newer than the last accepted one")]
    Replayed,
    /// A statement whose expiry has passed, or whose lifetime is longer than allowed.
    #[error("statement has expired")]
    Expired,
    /// A statement issued further in the future than the allowed clock skew.
    #[error("statement is issued in the future")]
    FromFuture,
    /// The sender exceeded its message rate.
    #[error("sender exceeded its message rate")]
    RateLimited,
    /// The sender's reputation fell below the ban threshold.
    #[error("sender is banned")]
    Banned,
    /// Content that does not match the hash it was sent under.
    #[error("content does not match its hash")]
    Corrupt,
    /// A peer this sender referred us to (a goodbye's referral) was not there: nobody listens
    /// at its addresses, or another peer (ourselves, say) answers at them.
    #[error("referred peer is not at its addresses")]
    BadReferral,
    /// A down report about this node naming an announcement it never made (a sequence number
    /// above its own): the reporter cannot have seen it, so the report is a lie.
    #[error("down report names an announcement that was never made")]
    FalseReport,
    /// A peer that announced itself a public relay refused our connection at every public
    /// address it announced (or another peer answered there, or all were silent while our
    /// own network worked) while we asked it for a reservation.
    #[error("announced itself a public relay but nobody serves at its address")]
    FalseRelay,
    /// An AutoNAT server called an address of ours unreachable shortly before another
    /// server's dial-back reached it.
    #[error("called a reachable address unreachable")]
    FalseVerdict,
    /// A peer that announced itself a relay with room refused our reservation request.
    #[error("announced itself a relay with room but refused a reservation")]
    RelayRefused,
    /// A neighbour passed on more of one issuer's statements than that issuer's rate lets a
    /// node that checks what it relays pass on: it relays without checking, or floods.
    #[error("relayed one issuer's statements beyond the rate any checking node passes on")]
    OverRelayed,
}

impl Rejection {
    /// Every reason, for pre-registering metric labels.
    pub const ALL: [Rejection; 15] = [
        Self::Oversized,
        Self::Malformed,
        Self::BadSignature,
        Self::Replayed,
        Self::Expired,
        Self::FromFuture,
        Self::RateLimited,
        Self::Banned,
        Self::Corrupt,
        Self::BadReferral,
        Self::FalseReport,
        Self::FalseRelay,
        Self::FalseVerdict,
        Self::RelayRefused,
        Self::OverRelayed,
    ];

    /// A short, stable label (used in metrics and logs).
    pub fn label(self) -> &'static str {
        match self {
            Self::Oversized => "oversized",
            Self::Malformed => "malformed",
            Self::BadSignature => "bad_signature",
            Self::Replayed => "replayed",
            Self::Expired => "expired",
            Self::FromFuture => "from_future",
            Self::RateLimited => "rate_limited",
            Self::Banned => "banned",
            Self::Corrupt => "corrupt",
            Self::BadReferral => "bad_referral",
            Self::FalseReport => "false_report",
            Self::FalseRelay => "false_relay",
            Self::FalseVerdict => "false_verdict",
            Self::RelayRefused => "relay_refused",
            Self::OverRelayed => "over_relayed",
        }
    }
}

/// Encodes `value` as CBOR.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    encode_into(value, &mut out);
    out
}

/// Feeds the CBOR of `value` to `hasher` as it is encoded, without building it in memory
/// (a training request's weights may be 64 MiB): the same digest as hashing [`encode`]'s.
pub fn hash_encoded<T: Serialize>(value: &T, hasher: &mut blake3::Hasher) {
    ciborium::into_writer(value, hasher).expect("CBOR encoding into a hasher does not fail");
}

/// Appends the CBOR of `value` to `out`.
pub fn encode_into<T: Serialize>(value: &T, out: &mut Vec<u8>) {
    // Writing into a Vec cannot fail for I/O reasons, and our types serialize infallibly.
    ciborium::into_writer(value, out).expect("CBOR encoding into a Vec does not fail");
}

/// Most elements a collection reserves room for before its elements arrive, whatever its
/// header claims (see the module documentation).
pub const MAX_PREALLOC_ELEMENTS: usize = 64;

/// Decodes CBOR bytes that came from outside, refusing inputs longer than `max_len`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], max_len: usize) -> Result<T, Rejection> {
    if bytes.len() > max_len {
        return Err(Rejection::Oversized);
    }
    let mut rest = bytes;
    let value = ciborium::de::from_reader_with_recursion_limit(&mut rest, MAX_DEPTH)
        .map(|capped::Root(value)| value)
        .map_err(|_| Rejection::Malformed)?;
    // One item, nothing after it: bytes appended to a valid message would make another
    // message (another gossip id, say) that decodes the same.
    if !rest.is_empty() {
        return Err(Rejection::Malformed);
    }
    Ok(value)
}

/// Deepest nesting of arrays and maps a decode follows (ours nest less than 10 deep); each
/// level costs stack, so a peer's deeply nested junk is refused early.
pub const MAX_DEPTH: usize = 64;

/// A deserializer wrapper that caps the size hints collections see at
/// [`MAX_PREALLOC_ELEMENTS`], all the way down (every nested deserializer, seed and visitor is
/// wrapped in turn). Everything else is passed through unchanged.
mod capped {
    use serde::de::{
        Deserialize, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess,
        VariantAccess, Visitor,
    };
    use std::fmt;

    use super::MAX_PREALLOC_ELEMENTS;

    /// Decodes a `T` through [`Capped`] (ciborium's deserializer is not public; this is how
    /// the wrapper gets between it and `T`).
    pub(super) struct Root<T>(pub(super) T);

    impl<'de, T: Deserialize<'de>> Deserialize<'de> for Root<T> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            T::deserialize(Capped(d)).map(Root)
        }
    }

    struct Capped<D>(D);

    struct Wrap<V>(V);

    struct Seed<S>(S);

    struct Seq<A>(A);

    struct Map<A>(A);

    struct Enum<A>(A);

    struct Variant<A>(A);

    fn cap(hint: Option<usize>) -> Option<usize> {
        hint.map(|n| n.min(MAX_PREALLOC_ELEMENTS))
    }

    macro_rules! forward_deserialize {
        ($($method:ident)*) => {$(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
                self.0.$method(Wrap(visitor))
            }
        )*};
    }

    impl<'de, D: Deserializer<'de>> Deserializer<'de> for Capped<D> {
        type Error = D::Error;

        forward_deserialize! {
            deserialize_any deserialize_bool deserialize_i8 deserialize_i16 deserialize_i32
            deserialize_i64 deserialize_i128 deserialize_u8 deserialize_u16 deserialize_u32
            deserialize_u64 deserialize_u128 deserialize_f32 deserialize_f64 deserialize_char
            deserialize_str deserialize_string deserialize_bytes deserialize_byte_buf
            deserialize_option deserialize_unit deserialize_seq deserialize_map
            deserialize_identifier deserialize_ignored_any
        }

        fn deserialize_unit_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            visitor: V,
        ) -> Result<V::Value, D::Error> {
            self.0.deserialize_unit_struct(name, Wrap(visitor))
        }

        fn deserialize_newtype_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            visitor: V,
        ) -> Result<V::Value, D::Error> {
            self.0.deserialize_newtype_struct(name, Wrap(visitor))
        }

        fn deserialize_tuple<V: Visitor<'de>>(
            self,
            len: usize,
            visitor: V,
        ) -> Result<V::Value, D::Error> {
            self.0.deserialize_tuple(len, Wrap(visitor))
        }

        fn deserialize_tuple_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            len: usize,
            visitor: V,
        ) -> Result<V::Value, D::Error> {
            self.0.deserialize_tuple_struct(name, len, Wrap(visitor))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, D::Error> {
            self.0.deserialize_struct(name, fields, Wrap(visitor))
        }

        fn deserialize_enum<V: Visitor<'de>>(
            self,
            name: &'static str,
            variants: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, D::Error> {
            self.0.deserialize_enum(name, variants, Wrap(visitor))
        }

        fn is_human_readable(&self) -> bool {
            self.0.is_human_readable()
        }
    }

    macro_rules! forward_visit {
        ($($method:ident($ty:ty))*) => {$(
            fn $method<E: serde::de::Error>(self, v: $ty) -> Result<V::Value, E> {
                self.0.$method(v)
            }
        )*};
    }

    impl<'de, V: Visitor<'de>> Visitor<'de> for Wrap<V> {
        type Value = V::Value;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            self.0.expecting(f)
        }

        forward_visit! {
            visit_bool(bool) visit_i8(i8) visit_i16(i16) visit_i32(i32) visit_i64(i64)
            visit_i128(i128) visit_u8(u8) visit_u16(u16) visit_u32(u32) visit_u64(u64)
            visit_u128(u128) visit_f32(f32) visit_f64(f64) visit_char(char)
            visit_str(&str) visit_borrowed_str(&'de str) visit_string(String)
            visit_bytes(&[u8]) visit_borrowed_bytes(&'de [u8]) visit_byte_buf(Vec<u8>)
        }

        fn visit_none<E: serde::de::Error>(self) -> Result<V::Value, E> {
            self.0.visit_none()
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<V::Value, E> {
            self.0.visit_unit()
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
            self.0.visit_some(Capped(d))
        }

        fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
            self.0.visit_newtype_struct(Capped(d))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
            self.0.visit_seq(Seq(seq))
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
            self.0.visit_map(Map(map))
        }

        fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<V::Value, A::Error> {
            self.0.visit_enum(Enum(data))
        }
    }

    impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Seed<S> {
        type Value = S::Value;

        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
            self.0.deserialize(Capped(d))
        }
    }

    impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Seq<A> {
        type Error = A::Error;

        fn next_element_seed<T: DeserializeSeed<'de>>(
            &mut self,
            seed: T,
        ) -> Result<Option<T::Value>, A::Error> {
            self.0.next_element_seed(Seed(seed))
        }

        fn size_hint(&self) -> Option<usize> {
            cap(self.0.size_hint())
        }
    }

    impl<'de, A: MapAccess<'de>> MapAccess<'de> for Map<A> {
        type Error = A::Error;

        fn next_key_seed<K: DeserializeSeed<'de>>(
            &mut self,
            seed: K,
        ) -> Result<Option<K::Value>, A::Error> {
            self.0.next_key_seed(Seed(seed))
        }

        fn next_value_seed<T: DeserializeSeed<'de>>(
            &mut self,
            seed: T,
        ) -> Result<T::Value, A::Error> {
            self.0.next_value_seed(Seed(seed))
        }

        fn size_hint(&self) -> Option<usize> {
            cap(self.0.size_hint())
        }
    }

    impl<'de, A: EnumAccess<'de>> EnumAccess<'de> for Enum<A> {
        type Error = A::Error;
        type Variant = Variant<A::Variant>;

        fn variant_seed<T: DeserializeSeed<'de>>(
            self,
            seed: T,
        ) -> Result<(T::Value, Self::Variant), A::Error> {
            let (value, variant) = self.0.variant_seed(Seed(seed))?;
            Ok((value, Variant(variant)))
        }
    }

    impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Variant<A> {
        type Error = A::Error;

        fn unit_variant(self) -> Result<(), A::Error> {
            self.0.unit_variant()
        }

        fn newtype_variant_seed<T: DeserializeSeed<'de>>(
            self,
            seed: T,
        ) -> Result<T::Value, A::Error> {
            self.0.newtype_variant_seed(Seed(seed))
        }

        fn tuple_variant<V: Visitor<'de>>(
            self,
            len: usize,
            visitor: V,
        ) -> Result<V::Value, A::Error> {
            self.0.tuple_variant(len, Wrap(visitor))
        }

        fn struct_variant<V: Visitor<'de>>(
            self,
            fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, A::Error> {
            self.0.struct_variant(fields, Wrap(visitor))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_refuses_bytes_after_the_item() {
        let bytes = encode(&(7u32, "seven".to_string()));
        assert_eq!(
            decode::<(u32, String)>(&bytes, 1_000),
            Ok((7, "seven".to_string()))
        );
        let mut padded = bytes.clone();
        padded.push(0);
        assert_eq!(
            decode::<(u32, String)>(&padded, 1_000),
            Err(Rejection::Malformed)
        );
        // A second whole item after the first is refused too.
        let mut twice = bytes.clone();
        twice.extend_from_slice(&bytes);
        assert_eq!(
            decode::<(u32, String)>(&twice, 1_000),
            Err(Rejection::Malformed)
        );
    }

    #[test]
    fn decode_refuses_oversized_input_before_parsing() {
        let bytes = encode(&vec![0u8; 100]);
        assert_eq!(decode::<Vec<u8>>(&bytes, 10), Err(Rejection::Oversized));
        assert_eq!(decode::<Vec<u8>>(&bytes, 1000).unwrap().len(), 100);
    }

    #[test]
    fn decode_reports_garbage_as_malformed() {
        assert_eq!(
            decode::<(u64, String)>(&[0xff, 0x00, 0x13], 100),
            Err(Rejection::Malformed)
        );
        // A CBOR array header claiming 2^32 elements with no body must not allocate it.
        let huge = [0x9a, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(decode::<Vec<u64>>(&huge, 100), Err(Rejection::Malformed));
    }
}
