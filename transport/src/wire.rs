//! The dispatch messages on the wire, written and read by hand: gRPC length-prefixed frames of the protobuf
//! `DispatchRequest` and `DispatchResponse` (proto/switchyard/v1/dispatch.proto).
//!
//! Why not prost and tonic's codec: a 4096 x 5120 dispatch moves 60-80 MB a round trip, and every pass over those
//! bytes shows in the throughput. prost encodes a message by copying its `bytes` fields into tonic's frame buffer, and
//! tonic's decoder copies every received HTTP/2 DATA frame into its own buffer before prost sees it. Here a message is
//! encoded in one buffer (gRPC prefix, protobuf header, the payload quantised or rounded straight into place, the
//! trailing fields) that HTTP/2 sends from where it lies, and a received message is kept as the DATA frames it arrived
//! in ([`Chunks`]), which the codec decodes straight into the f32 block.
//!
//! The bytes are exactly prost's: fields in number order, zero values and empty fields left out (proto3), so any gRPC
//! peer (the generated tonic client and server, grpcurl) reads them. Reading accepts any valid encoding of the two
//! messages: fields in any order, repeated fields (the last wins, nested messages merge), unknown fields skipped.
//! Anything else is a [`TransportError::InvalidPayload`] naming the message and what was wrong with it.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use switchyard_proto::v1::{ActivationDtype, Activations, DispatchRequest, DispatchResponse};

use crate::codec::{self, bytes_per_value, Recycled, Recycler, RequestIds};
use crate::{ExpertBatch, TransportError, WireDtype, WireFormat};

/// Bytes before each gRPC message: a compression flag and the big-endian `u32` length.
pub(crate) const PREFIX: usize = 5;

fn malformed(what: &str, reason: String) -> TransportError {
    TransportError::InvalidPayload { what: what.to_owned(), reason }
}

// ---------------------------------------------------------------------------------------------------------------
// Received bytes
// ---------------------------------------------------------------------------------------------------------------

/// Bytes as they were received, in the pieces they arrived in; no piece is empty.
#[derive(Debug, Clone, Default)]
pub(crate) struct Chunks {
    parts: Vec<Bytes>,
    len: usize,
}

impl Chunks {
    /// Total length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn push(&mut self, part: Bytes) {
        if !part.is_empty() {
            self.len += part.len();
            self.parts.push(part);
        }
    }

    /// The bytes in one piece (copied unless there is only one).
    pub(crate) fn to_bytes(&self) -> Bytes {
        match self.parts.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            parts => Bytes::from(parts.concat()),
        }
    }

    /// Calls `run(first, bytes)` for consecutive runs of whole values of `width` bytes (1 to 8), `first` being the
    /// index of the run's first value: the pieces where they lie, except a value split between two pieces, which is
    /// copied and passed alone. Trailing bytes short of a whole value are not passed (callers check lengths first).
    pub(crate) fn for_each_run(&self, width: usize, mut run: impl FnMut(usize, &[u8])) {
        debug_assert!((1..=8).contains(&width));
        let mut carry = [0u8; 8];
        let mut carried = 0;
        let mut value = 0;
        for part in &self.parts {
            let mut bytes = &part[..];
            if carried > 0 {
                let n = (width - carried).min(bytes.len());
                carry[carried..carried + n].copy_from_slice(&bytes[..n]);
                carried += n;
                bytes = &bytes[n..];
                if carried < width {
                    continue;
                }
                run(value, &carry[..width]);
                value += 1;
            }
            let whole = bytes.len() / width * width;
            if whole > 0 {
                run(value, &bytes[..whole]);
                value += whole / width;
            }
            let rest = &bytes[whole..];
            carry[..rest.len()].copy_from_slice(rest);
            carried = rest.len();
        }
    }
}

impl From<Bytes> for Chunks {
    fn from(bytes: Bytes) -> Self {
        let mut chunks = Chunks::default();
        chunks.push(bytes);
        chunks
    }
}

/// Splits the data frames of a gRPC body into messages, without copying their bytes.
pub(crate) struct MessageReader {
    pending: VecDeque<Bytes>,
    buffered: usize,
    /// The largest message accepted, in bytes.
    limit: usize,
}

impl MessageReader {
    /// A reader refusing messages longer than `limit` bytes.
    pub(crate) fn new(limit: usize) -> Self {
        MessageReader { pending: VecDeque::new(), buffered: 0, limit }
    }

    /// Adds the next data frame of the body.
    pub(crate) fn push(&mut self, data: Bytes) {
        if !data.is_empty() {
            self.buffered += data.len();
            self.pending.push_back(data);
        }
    }

    /// Bytes received that are not part of a returned message yet: at the end of a body, a message cut short.
    pub(crate) fn buffered(&self) -> usize {
        self.buffered
    }

    /// The next whole message, if it has arrived. A compressed message (this side never asks for compression) or one
    /// over the limit is refused.
    pub(crate) fn next_message(&mut self) -> Result<Option<Chunks>, TransportError> {
        if self.buffered < PREFIX {
            return Ok(None);
        }
        let mut prefix = [0u8; PREFIX];
        let mut filled = 0;
        for part in &self.pending {
            let n = (PREFIX - filled).min(part.len());
            prefix[filled..filled + n].copy_from_slice(&part[..n]);
            filled += n;
            if filled == PREFIX {
                break;
            }
        }
        match prefix[0] {
            0 => {}
            1 => return Err(malformed("grpc message", "compressed, but no compression was negotiated".into())),
            flag => return Err(malformed("grpc message", format!("invalid compression flag {flag}"))),
        }
        let length = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if length > self.limit {
            return Err(malformed("grpc message", format!("{length} bytes, more than the limit {}", self.limit)));
        }
        if self.buffered < PREFIX + length {
            return Ok(None);
        }
        self.take(PREFIX);
        Ok(Some(self.take(length)))
    }

    /// The first `n` buffered bytes (`n <= buffered`).
    fn take(&mut self, mut n: usize) -> Chunks {
        let mut taken = Chunks::default();
        self.buffered -= n;
        while n > 0 {
            let Some(front) = self.pending.front_mut() else { break };
            if front.len() <= n {
                n -= front.len();
                if let Some(part) = self.pending.pop_front() {
                    taken.push(part);
                }
            } else {
                taken.push(front.split_to(n));
                n = 0;
            }
        }
        taken
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Decoded messages
// ---------------------------------------------------------------------------------------------------------------

/// `Activations` as received: the header decoded, the bytes where they arrived.
#[derive(Debug, Clone, Default)]
pub(crate) struct ActivationsMessage {
    pub(crate) dtype: i32,
    pub(crate) tokens: u32,
    pub(crate) hidden: u32,
    pub(crate) data: Chunks,
    pub(crate) token_scales: Chunks,
}

impl From<&Activations> for ActivationsMessage {
    fn from(activations: &Activations) -> Self {
        ActivationsMessage {
            dtype: activations.dtype,
            tokens: activations.tokens,
            hidden: activations.hidden,
            data: activations.data.clone().into(),
            token_scales: activations.token_scales.clone().into(),
        }
    }
}

/// `DispatchRequest` as received.
#[derive(Debug, Clone, Default)]
pub(crate) struct RequestMessage {
    pub(crate) request_id: u64,
    pub(crate) step_id: u64,
    pub(crate) micro_batch: u32,
    pub(crate) layer: u32,
    pub(crate) placement_epoch: u64,
    pub(crate) attention_worker: String,
    pub(crate) expert_ids: Chunks,
    pub(crate) activations: Option<ActivationsMessage>,
    pub(crate) output_dtype: i32,
}

impl RequestMessage {
    /// What the response echoes.
    pub(crate) fn ids(&self) -> RequestIds {
        RequestIds {
            request_id: self.request_id,
            step_id: self.step_id,
            micro_batch: self.micro_batch,
            layer: self.layer,
        }
    }
}

impl From<&DispatchRequest> for RequestMessage {
    fn from(request: &DispatchRequest) -> Self {
        RequestMessage {
            request_id: request.request_id,
            step_id: request.step_id,
            micro_batch: request.micro_batch,
            layer: request.layer,
            placement_epoch: request.placement_epoch,
            attention_worker: request.attention_worker.clone(),
            expert_ids: request.expert_ids.clone().into(),
            activations: request.activations.as_ref().map(ActivationsMessage::from),
            output_dtype: request.output_dtype,
        }
    }
}

/// `DispatchResponse` as received.
#[derive(Debug, Clone, Default)]
pub(crate) struct ResponseMessage {
    pub(crate) request_id: u64,
    pub(crate) step_id: u64,
    pub(crate) micro_batch: u32,
    pub(crate) layer: u32,
    pub(crate) outputs: Option<ActivationsMessage>,
}

impl From<&DispatchResponse> for ResponseMessage {
    fn from(response: &DispatchResponse) -> Self {
        ResponseMessage {
            request_id: response.request_id,
            step_id: response.step_id,
            micro_batch: response.micro_batch,
            layer: response.layer,
            outputs: response.outputs.as_ref().map(ActivationsMessage::from),
        }
    }
}

/// A field's value as read: protobuf wire types 0 and 2; fixed-width values are skipped (no field here has one).
enum Value {
    Varint(u64),
    Bytes(Chunks),
    Fixed,
}

/// Reads protobuf fields from a message held in pieces.
struct Cursor<'a> {
    parts: &'a [Bytes],
    part: usize,
    offset: usize,
    left: usize,
    /// The message's name, for errors.
    what: &'a str,
}

impl<'a> Cursor<'a> {
    fn new(message: &'a Chunks, what: &'a str) -> Self {
        Cursor { parts: &message.parts, part: 0, offset: 0, left: message.len, what }
    }

    fn truncated(&self, wanted: &str) -> TransportError {
        malformed(self.what, format!("truncated: {wanted} runs past the end of the message"))
    }

    fn byte(&mut self) -> Option<u8> {
        if self.left == 0 {
            return None;
        }
        let part = &self.parts[self.part];
        let byte = part[self.offset];
        self.left -= 1;
        self.offset += 1;
        if self.offset == part.len() {
            self.part += 1;
            self.offset = 0;
        }
        Some(byte)
    }

    /// A base-128 varint as prost reads it: at most 10 bytes, the tenth at most 1.
    fn varint(&mut self, wanted: &str) -> Result<u64, TransportError> {
        let mut value = 0u64;
        for index in 0..10 {
            let byte = self.byte().ok_or_else(|| self.truncated(wanted))?;
            if index == 9 && byte > 1 {
                return Err(malformed(self.what, format!("{wanted} is a varint longer than 64 bits")));
            }
            value |= u64::from(byte & 0x7F) << (7 * index);
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err(malformed(self.what, format!("{wanted} is a varint longer than 64 bits")))
    }

    /// The next `n` bytes, as slices of the pieces.
    fn take(&mut self, n: usize, wanted: &str) -> Result<Chunks, TransportError> {
        if n > self.left {
            return Err(self.truncated(wanted));
        }
        let mut taken = Chunks::default();
        let mut n = n;
        self.left -= n;
        while n > 0 {
            let part = &self.parts[self.part];
            let k = (part.len() - self.offset).min(n);
            taken.push(part.slice(self.offset..self.offset + k));
            n -= k;
            self.offset += k;
            if self.offset == part.len() {
                self.part += 1;
                self.offset = 0;
            }
        }
        Ok(taken)
    }

    /// Reads every field, calling `field(number, value)` for each in order.
    fn fields(mut self, mut field: impl FnMut(u32, Value) -> Result<(), TransportError>) -> Result<(), TransportError> {
        while self.left > 0 {
            let key = self.varint("a field key")?;
            let number = key >> 3;
            if number == 0 || number > u64::from(u32::MAX >> 3) {
                return Err(malformed(self.what, format!("invalid field number {number}")));
            }
            let number = number as u32;
            let wanted = format!("field {number}");
            let value = match key & 7 {
                0 => Value::Varint(self.varint(&wanted)?),
                1 | 5 => {
                    let width = if key & 7 == 1 { 8 } else { 4 };
                    self.take(width, &wanted)?;
                    Value::Fixed
                }
                2 => {
                    let length = self.varint(&wanted)?;
                    let length = usize::try_from(length).unwrap_or(usize::MAX);
                    Value::Bytes(self.take(length, &wanted)?)
                }
                wire_type => {
                    return Err(malformed(
                        self.what,
                        format!("field {number} has wire type {wire_type} (groups are not used by this protocol)"),
                    ))
                }
            };
            field(number, value)?;
        }
        Ok(())
    }
}

fn wrong_type(what: &str, name: &str) -> TransportError {
    malformed(what, format!("field {name} has the wrong wire type"))
}

fn varint(what: &str, name: &str, value: Value) -> Result<u64, TransportError> {
    match value {
        Value::Varint(v) => Ok(v),
        _ => Err(wrong_type(what, name)),
    }
}

fn length_delimited(what: &str, name: &str, value: Value) -> Result<Chunks, TransportError> {
    match value {
        Value::Bytes(bytes) => Ok(bytes),
        _ => Err(wrong_type(what, name)),
    }
}

/// Reads the fields of an `Activations` message into `into` (merging, as protobuf does for a repeated message field).
fn read_activations(message: &Chunks, what: &str, into: &mut ActivationsMessage) -> Result<(), TransportError> {
    Cursor::new(message, what).fields(|number, value| {
        match number {
            // Enums and uint32 are truncated from the 64-bit varint, as prost does.
            1 => into.dtype = varint(what, "dtype", value)? as i32,
            2 => into.tokens = varint(what, "tokens", value)? as u32,
            3 => into.hidden = varint(what, "hidden", value)? as u32,
            4 => into.data = length_delimited(what, "data", value)?,
            5 => into.token_scales = length_delimited(what, "token_scales", value)?,
            _ => {}
        }
        Ok(())
    })
}

/// Decodes a `DispatchRequest`; the payload stays in the received pieces.
pub(crate) fn read_request(message: &Chunks) -> Result<RequestMessage, TransportError> {
    const WHAT: &str = "DispatchRequest";
    let mut request = RequestMessage::default();
    Cursor::new(message, WHAT).fields(|number, value| {
        match number {
            1 => request.request_id = varint(WHAT, "request_id", value)?,
            2 => request.step_id = varint(WHAT, "step_id", value)?,
            3 => request.micro_batch = varint(WHAT, "micro_batch", value)? as u32,
            4 => request.layer = varint(WHAT, "layer", value)? as u32,
            5 => request.placement_epoch = varint(WHAT, "placement_epoch", value)?,
            6 => {
                let text = length_delimited(WHAT, "attention_worker", value)?.to_bytes();
                request.attention_worker = String::from_utf8(text.to_vec())
                    .map_err(|_| malformed("attention_worker", "not valid UTF-8".into()))?;
            }
            7 => request.expert_ids = length_delimited(WHAT, "expert_ids", value)?,
            8 => {
                let body = length_delimited(WHAT, "activations", value)?;
                read_activations(&body, "activations", request.activations.get_or_insert_with(Default::default))?;
            }
            9 => request.output_dtype = varint(WHAT, "output_dtype", value)? as i32,
            _ => {}
        }
        Ok(())
    })?;
    Ok(request)
}

/// Decodes a `DispatchResponse`; the payload stays in the received pieces.
pub(crate) fn read_response(message: &Chunks) -> Result<ResponseMessage, TransportError> {
    const WHAT: &str = "DispatchResponse";
    let mut response = ResponseMessage::default();
    Cursor::new(message, WHAT).fields(|number, value| {
        match number {
            1 => response.request_id = varint(WHAT, "request_id", value)?,
            2 => response.step_id = varint(WHAT, "step_id", value)?,
            3 => response.micro_batch = varint(WHAT, "micro_batch", value)? as u32,
            4 => response.layer = varint(WHAT, "layer", value)? as u32,
            5 => {
                let body = length_delimited(WHAT, "outputs", value)?;
                read_activations(&body, "outputs", response.outputs.get_or_insert_with(Default::default))?;
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(response)
}

// ---------------------------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------------------------

fn varint_len(value: u64) -> usize {
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A varint field, left out when zero (proto3). Enums are passed as `i32 as i64 as u64`, as prost sign-extends them.
fn put_varint_field(out: &mut Vec<u8>, number: u32, value: u64) {
    if value != 0 {
        put_varint(out, u64::from(number << 3));
        put_varint(out, value);
    }
}

/// The key and length of a length-delimited field.
fn put_length_key(out: &mut Vec<u8>, number: u32, length: usize) {
    put_varint(out, u64::from(number << 3 | 2));
    put_varint(out, length as u64);
}

fn varint_field_len(number: u32, value: u64) -> usize {
    if value == 0 {
        0
    } else {
        varint_len(u64::from(number << 3)) + varint_len(value)
    }
}

/// Length of a `bytes` field of `length` bytes, left out when empty.
fn bytes_field_len(number: u32, length: usize) -> usize {
    if length == 0 {
        0
    } else {
        varint_len(u64::from(number << 3 | 2)) + varint_len(length as u64) + length
    }
}

fn enum_value(dtype: WireDtype) -> u64 {
    ActivationDtype::from(dtype) as i32 as i64 as u64
}

/// An `Activations` block about to be encoded: `tokens` rows of `hidden` values as `dtype`.
struct Block<'a> {
    values: &'a [f32],
    tokens: usize,
    hidden: usize,
    dtype: WireDtype,
}

impl Block<'_> {
    fn data_len(&self) -> usize {
        self.values.len() * bytes_per_value(self.dtype)
    }

    fn scales_len(&self) -> usize {
        if self.dtype == WireDtype::Fp8E4m3 {
            self.tokens * 4
        } else {
            0
        }
    }

    /// Length of the encoded `Activations` message.
    fn message_len(&self) -> usize {
        varint_field_len(1, enum_value(self.dtype))
            + varint_field_len(2, self.tokens as u64)
            + varint_field_len(3, self.hidden as u64)
            + bytes_field_len(4, self.data_len())
            + bytes_field_len(5, self.scales_len())
    }

    /// Appends the `Activations` field `number` up to the start of its data: what precedes the payload.
    fn put_head(&self, out: &mut Vec<u8>, number: u32) {
        put_length_key(out, number, self.message_len());
        put_varint_field(out, 1, enum_value(self.dtype));
        put_varint_field(out, 2, self.tokens as u64);
        put_varint_field(out, 3, self.hidden as u64);
        if self.data_len() > 0 {
            put_length_key(out, 4, self.data_len());
        }
    }
}

/// Writes one whole gRPC message: `head` (starting with [`PREFIX`] bytes of room), `block`'s payload encoded in place,
/// its scales field, then `suffix`. The buffer comes from `recycler` if there is one and returns to it once HTTP/2
/// has sent the message.
fn write_message(mut head: Vec<u8>, block: &Block<'_>, suffix: &[u8], recycler: Option<&Arc<Recycler<u8>>>) -> Bytes {
    let scales_len = block.scales_len();
    let scales_field = bytes_field_len(5, scales_len);
    let total = head.len() + block.data_len() + scales_field + suffix.len();
    // Callers keep messages far below 4 GiB (`MAX_MESSAGE_BYTES`, checked before encoding).
    let length = u32::try_from(total - PREFIX).unwrap_or(u32::MAX);
    head[0] = 0;
    head[1..PREFIX].copy_from_slice(&length.to_be_bytes());
    let mut buffer = match recycler {
        Some(recycler) => recycler.take(total),
        None => vec![0u8; total],
    };
    buffer[..head.len()].copy_from_slice(&head);
    let data = head.len()..head.len() + block.data_len();
    let mut scales = vec![1.0f32; if scales_len > 0 { block.tokens } else { 0 }];
    codec::encode_values(block.values, block.hidden, block.dtype, &mut buffer[data.clone()], &mut scales);
    let mut tail = Vec::with_capacity(scales_field + suffix.len());
    if scales_len > 0 {
        put_length_key(&mut tail, 5, scales_len);
        tail.extend(scales.iter().flat_map(|scale| scale.to_le_bytes()));
    }
    tail.extend_from_slice(suffix);
    buffer[data.end..].copy_from_slice(&tail);
    match recycler {
        Some(recycler) => Bytes::from_owner(Recycled::new(buffer, recycler.clone())),
        None => Bytes::from(buffer),
    }
}

/// An upper bound of the encoded size of a request or response carrying `values` values of `tokens` rows as `dtype`,
/// `extra` bytes of strings: checked against the message limit before encoding.
pub(crate) fn message_size_bound(values: usize, tokens: usize, dtype: WireDtype, extra: usize) -> usize {
    values.saturating_mul(bytes_per_value(dtype)).saturating_add(tokens.saturating_mul(8)).saturating_add(extra + 128)
}

/// The gRPC message (prefix included) carrying the rows `experts` / `inputs` of `batch` with the ids of `batch`, the
/// inputs encoded as `wire.dispatch` straight into the message: byte for byte prost's encoding of the same
/// `DispatchRequest` ([`codec::request_from_batch`]) after the prefix.
pub(crate) fn encode_request(
    request_id: u64,
    batch: &ExpertBatch,
    experts: &[u32],
    inputs: &[f32],
    wire: WireFormat,
    recycler: Option<&Arc<Recycler<u8>>>,
) -> Bytes {
    let block = Block { values: inputs, tokens: experts.len(), hidden: batch.hidden, dtype: wire.dispatch };
    let worker = batch.attention_worker.as_bytes();
    let mut head = Vec::with_capacity(PREFIX + 64 + worker.len() + experts.len() * 4);
    head.extend_from_slice(&[0; PREFIX]);
    put_varint_field(&mut head, 1, request_id);
    put_varint_field(&mut head, 2, batch.step_id);
    put_varint_field(&mut head, 3, u64::from(batch.micro_batch));
    put_varint_field(&mut head, 4, u64::from(batch.layer));
    put_varint_field(&mut head, 5, batch.placement_epoch);
    if !worker.is_empty() {
        put_length_key(&mut head, 6, worker.len());
        head.extend_from_slice(worker);
    }
    if !experts.is_empty() {
        put_length_key(&mut head, 7, experts.len() * 4);
        head.extend(experts.iter().flat_map(|expert| expert.to_le_bytes()));
    }
    block.put_head(&mut head, 8);
    let mut suffix = Vec::with_capacity(2);
    put_varint_field(&mut suffix, 9, enum_value(wire.combine));
    write_message(head, &block, &suffix, recycler)
}

/// The gRPC message (prefix included) carrying `outputs` (`tokens` rows of `hidden`) as `dtype`, encoded straight into
/// the message: byte for byte prost's encoding of [`codec::response_from_outputs`] after the prefix.
pub(crate) fn encode_response(
    ids: RequestIds,
    outputs: &[f32],
    tokens: usize,
    hidden: usize,
    dtype: WireDtype,
    recycler: Option<&Arc<Recycler<u8>>>,
) -> Bytes {
    let block = Block { values: outputs, tokens, hidden, dtype };
    let mut head = Vec::with_capacity(PREFIX + 64);
    head.extend_from_slice(&[0; PREFIX]);
    put_varint_field(&mut head, 1, ids.request_id);
    put_varint_field(&mut head, 2, ids.step_id);
    put_varint_field(&mut head, 3, u64::from(ids.micro_batch));
    put_varint_field(&mut head, 4, u64::from(ids.layer));
    block.put_head(&mut head, 5);
    write_message(head, &block, &[], recycler)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::codec::tests::{field_of, values};

    /// Ids large enough to take multi-byte varints.
    fn batch(tokens: usize, hidden: usize) -> ExpertBatch {
        ExpertBatch {
            step_id: 1 << 40,
            micro_batch: 1,
            layer: 300,
            placement_epoch: 7,
            attention_worker: "attn-0".into(),
            experts: (0..tokens as u32).map(|t| t * 37 % 256).collect(),
            inputs: values(tokens, hidden),
            hidden,
        }
    }

    const FORMATS: [WireFormat; 4] = [
        WireFormat { dispatch: WireDtype::F32, combine: WireDtype::F32 },
        WireFormat { dispatch: WireDtype::Bf16, combine: WireDtype::Bf16 },
        WireFormat { dispatch: WireDtype::Fp8E4m3, combine: WireDtype::Bf16 },
        WireFormat { dispatch: WireDtype::Fp8E4m3, combine: WireDtype::Fp8E4m3 },
    ];

    /// Splits `bytes` into pieces of the given lengths (cycled), as HTTP/2 frames might cut them.
    fn pieces(bytes: &[u8], lengths: &[usize]) -> Vec<Bytes> {
        let mut out = Vec::new();
        let mut start = 0;
        for &length in lengths.iter().cycle() {
            if start >= bytes.len() {
                break;
            }
            let end = (start + length.max(1)).min(bytes.len());
            out.push(Bytes::copy_from_slice(&bytes[start..end]));
            start = end;
        }
        out
    }

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8];
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(message);
        out
    }

    fn read_all(frames: Vec<Bytes>) -> Vec<Chunks> {
        let mut reader = MessageReader::new(1 << 30);
        let mut messages = Vec::new();
        for frame in frames {
            reader.push(frame);
            while let Some(message) = reader.next_message().unwrap() {
                messages.push(message);
            }
        }
        assert_eq!(reader.buffered(), 0);
        messages
    }

    #[test]
    fn requests_are_byte_for_byte_prost() {
        let recycler = Recycler::new();
        for wire in FORMATS {
            for (tokens, hidden) in [(5, 33), (1, 1), (0, 16), (200, 64)] {
                let mut b = batch(tokens, hidden);
                for (worker, request_id) in [("attn-0", 41u64), ("", 0), ("ü", u64::MAX)] {
                    b.attention_worker = worker.into();
                    let prost_bytes = codec::request_from_batch(request_id, &b, wire).encode_to_vec();
                    for recycler in [None, Some(&recycler)] {
                        let ours = encode_request(request_id, &b, &b.experts, &b.inputs, wire, recycler);
                        assert_eq!(ours[..], framed(&prost_bytes)[..], "{wire:?} [{tokens}, {hidden}] {worker:?}");
                    }
                }
            }
        }
        let zero = ExpertBatch { step_id: 0, micro_batch: 0, layer: 0, placement_epoch: 0, ..batch(2, 8) };
        let prost_bytes = codec::request_from_batch(0, &zero, WireFormat::default()).encode_to_vec();
        assert_eq!(
            encode_request(0, &zero, &zero.experts, &zero.inputs, WireFormat::default(), None)[..],
            framed(&prost_bytes)
        );
    }

    #[test]
    fn responses_are_byte_for_byte_prost() {
        for dtype in [WireDtype::F32, WireDtype::Bf16, WireDtype::Fp8E4m3] {
            for (tokens, hidden) in [(5, 33), (0, 16), (3, 5120)] {
                let outputs = values(tokens, hidden);
                for ids in [RequestIds { request_id: 3, step_id: 9, micro_batch: 1, layer: 2 }, RequestIds::default()] {
                    let prost_bytes =
                        codec::response_from_outputs(ids, &outputs, tokens, hidden, dtype).encode_to_vec();
                    let ours = encode_response(ids, &outputs, tokens, hidden, dtype, None);
                    assert_eq!(ours[..], framed(&prost_bytes)[..], "{dtype} [{tokens}, {hidden}]");
                }
            }
        }
    }

    #[test]
    fn reading_any_split_gives_prosts_message() {
        let wire = WireFormat { dispatch: WireDtype::Fp8E4m3, combine: WireDtype::Bf16 };
        let b = batch(7, 40);
        let request = codec::request_from_batch(12, &b, wire);
        let mut stream = framed(&request.encode_to_vec());
        let response = codec::response_from_outputs(RequestIds::of(&request), &b.inputs, 7, 40, WireDtype::Bf16);
        stream.extend(framed(&response.encode_to_vec()));
        stream.extend(framed(&[]));
        for lengths in [&[1usize][..], &[2], &[3, 7], &[4096], &[5, 1, 300]] {
            let messages = read_all(pieces(&stream, lengths));
            assert_eq!(messages.len(), 3, "{lengths:?}");
            let got = read_request(&messages[0]).unwrap();
            let want = RequestMessage::from(&request);
            assert_eq!(strip(&got), strip(&want));
            assert_eq!(codec::batch_from_message(&got, None).unwrap(), codec::batch_from_request(&request).unwrap());
            let got = read_response(&messages[1]).unwrap();
            let mut out = vec![0.0; 7 * 40];
            codec::outputs_from_message_into(&got, 7, 40, &mut out, codec::Stores::Streaming).unwrap();
            assert_eq!(out, codec::outputs_from_response(&response, 7, 40).unwrap(), "{lengths:?}");
            assert!(messages[2].is_empty());
            assert_eq!(read_request(&messages[2]).unwrap().request_id, 0);
        }
    }

    /// The message with its byte fields flattened, to compare regardless of how the bytes were split.
    fn strip(request: &RequestMessage) -> String {
        let fields = (
            request.request_id,
            request.step_id,
            request.micro_batch,
            request.layer,
            request.placement_epoch,
            request.attention_worker.clone(),
            request.expert_ids.to_bytes(),
            request.output_dtype,
            request
                .activations
                .as_ref()
                .map(|a| (a.dtype, a.tokens, a.hidden, a.data.to_bytes(), a.token_scales.to_bytes())),
        );
        format!("{fields:?}")
    }

    #[test]
    fn any_field_order_unknown_fields_and_merges_are_read() {
        // Fields out of order, an unknown varint, fixed32, fixed64 and bytes field, the activations in two parts.
        let mut message = Vec::new();
        put_varint_field(&mut message, 9, 2);
        put_varint_field(&mut message, 100, 5);
        put_varint(&mut message, 101 << 3 | 5);
        message.extend_from_slice(&[1, 2, 3, 4]);
        put_varint(&mut message, 102 << 3 | 1);
        message.extend_from_slice(&[0; 8]);
        put_length_key(&mut message, 103, 3);
        message.extend_from_slice(b"xyz");
        let mut first = Vec::new();
        put_varint_field(&mut first, 1, 2);
        put_varint_field(&mut first, 2, 1);
        put_length_key(&mut message, 8, first.len());
        message.extend_from_slice(&first);
        put_varint_field(&mut message, 1, 77);
        let mut second = Vec::new();
        put_varint_field(&mut second, 3, 2);
        put_length_key(&mut second, 4, 4);
        second.extend_from_slice(&[0x80, 0x3F, 0x00, 0x40]);
        put_length_key(&mut message, 8, second.len());
        message.extend_from_slice(&second);
        put_length_key(&mut message, 7, 4);
        message.extend_from_slice(&3u32.to_le_bytes());
        put_varint_field(&mut message, 1, 78);
        let request = read_request(&Chunks::from(Bytes::from(message.clone()))).unwrap();
        let prost_request = DispatchRequest::decode(&message[..]).unwrap();
        assert_eq!(request.request_id, 78, "the last value wins");
        assert_eq!(strip(&request), strip(&RequestMessage::from(&prost_request)));
        let batch = codec::batch_from_message(&request, None).unwrap();
        assert_eq!((batch.experts, batch.inputs, batch.hidden), (vec![3], vec![1.0, 2.0], 2));
    }

    #[test]
    fn malformed_messages_are_invalid_payloads() {
        let b = batch(3, 16);
        let good = codec::request_from_batch(5, &b, WireFormat::default()).encode_to_vec();
        let read = |bytes: &[u8]| read_request(&Chunks::from(Bytes::copy_from_slice(bytes)));
        // Every truncation of a valid message is refused or reads as a shorter valid one; none panics.
        for cut in 0..good.len() {
            let _ = read(&good[..cut]);
        }
        assert_eq!(field_of(read(&good[..good.len() - 1]).unwrap_err()), "DispatchRequest");
        // A varint running off the end, or longer than 10 bytes.
        assert_eq!(field_of(read(&[0x08, 0xFF]).unwrap_err()), "DispatchRequest");
        assert_eq!(
            field_of(read(&[0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x02]).unwrap_err()),
            "DispatchRequest"
        );
        // A length past the end, a known field with the wrong wire type, field 0, a group.
        assert_eq!(field_of(read(&[0x3A, 0x10, 0, 0]).unwrap_err()), "DispatchRequest");
        assert_eq!(field_of(read(&[0x0A, 0x00]).unwrap_err()), "DispatchRequest");
        assert_eq!(field_of(read(&[0x00, 0x00]).unwrap_err()), "DispatchRequest");
        assert_eq!(field_of(read(&[0x0B]).unwrap_err()), "DispatchRequest");
        // Inside the activations: a bad nested field names the nested message.
        assert_eq!(field_of(read(&[0x42, 0x02, 0x08, 0xFF]).unwrap_err()), "activations");
        assert_eq!(field_of(read(&[0x32, 0x02, 0xC3, 0x28]).unwrap_err()), "attention_worker");
        let response = |bytes: &[u8]| read_response(&Chunks::from(Bytes::copy_from_slice(bytes)));
        assert_eq!(field_of(response(&[0x2A, 0x02, 0x22, 0x05]).unwrap_err()), "outputs");
        assert_eq!(field_of(response(&[0x2A, 0x01]).unwrap_err()), "DispatchResponse");

        // Framing: compressed, an unknown flag, over the limit; a message cut short stays buffered.
        let mut reader = MessageReader::new(100);
        reader.push(Bytes::from_static(&[1, 0, 0, 0, 1, 0]));
        assert_eq!(field_of(reader.next_message().unwrap_err()), "grpc message");
        let mut reader = MessageReader::new(100);
        reader.push(Bytes::from_static(&[7, 0, 0, 0, 0]));
        assert_eq!(field_of(reader.next_message().unwrap_err()), "grpc message");
        let mut reader = MessageReader::new(100);
        reader.push(Bytes::from_static(&[0, 0, 0, 0, 101]));
        assert_eq!(field_of(reader.next_message().unwrap_err()), "grpc message");
        let mut reader = MessageReader::new(100);
        reader.push(Bytes::from_static(&[0, 0, 0, 0, 100, 1, 2]));
        assert!(reader.next_message().unwrap().is_none());
        assert_eq!(reader.buffered(), 7);
    }

    #[test]
    fn runs_cover_every_value_once() {
        let bytes: Vec<u8> = (0..=255).collect();
        for width in [1, 2, 4] {
            for lengths in [&[1usize][..], &[3], &[5, 2], &[256]] {
                let mut chunks = Chunks::default();
                for piece in pieces(&bytes, lengths) {
                    chunks.push(piece);
                }
                let mut seen = Vec::new();
                let mut next = 0;
                chunks.for_each_run(width, |first, run| {
                    assert_eq!(first, next);
                    assert_eq!(run.len() % width, 0);
                    next += run.len() / width;
                    seen.extend_from_slice(run);
                });
                assert_eq!(seen, bytes, "width {width}, pieces {lengths:?}");
            }
        }
    }
}
