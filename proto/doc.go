// Package proto is Sigil's wire protocol and nothing else: length-prefixed
// msgpack frames, the request and response messages, operation numbers,
// algorithm numbers and the stable error codes. It imports nothing of Sigil's,
// so the agent, the Go client and other implementations share one definition.
//
// A frame is a 4-byte big-endian payload length followed by one msgpack map.
// Map keys are short strings; decoders skip keys they do not know, so a field
// can be added without a version bump. docs/protocol.md is the reference.
package proto
