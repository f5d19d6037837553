//! Just enough telnet (RFC 854) for a console client: character-at-a-time input with the guest
//! doing the echo, 0xFF passed through both ways, and the client's window size (NAWS,
//! RFC 1073), which becomes the console size the guest sees.
//!
//! Option negotiation follows RFC 854's rule against loops: a request that would not change an
//! option's state gets no answer, and options the console does not use are refused.

use std::borrow::Cow;
use std::collections::VecDeque;

const IAC: u8 = 255;
const DONT: u8 = 254;
const DO: u8 = 253;
const WONT: u8 = 252;
const WILL: u8 = 251;
const SB: u8 = 250;
const SE: u8 = 240;

const OPT_ECHO: u8 = 1;
const OPT_SGA: u8 = 3;
const OPT_NAWS: u8 = 31;

/// What the console says first: it echoes (the guest does) and suppresses go-ahead, which puts
/// clients in character mode, and it asks for the window size.
pub const GREETING: &[u8] = &[IAC, WILL, OPT_ECHO, IAC, WILL, OPT_SGA, IAC, DO, OPT_NAWS];

/// Longest subnegotiation kept; longer ones (none the console uses) are cut.
const MAX_SUB: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Data,
    /// After a CR: a following NUL or LF belongs to it (NVT end of line).
    Cr,
    Iac,
    /// After IAC WILL/WONT/DO/DONT.
    Option(u8),
    Sub,
    SubIac,
}

/// One client's telnet state.
#[derive(Debug)]
pub struct Telnet {
    state: State,
    /// Options enabled on the client's side (we sent DO or answered its WILL with DO).
    his: [bool; 256],
    /// Options enabled on our side.
    ours: [bool; 256],
    sub: Vec<u8>,
}

impl Default for Telnet {
    fn default() -> Self {
        Self::new()
    }
}

impl Telnet {
    /// The state right after [`GREETING`] was sent.
    pub fn new() -> Self {
        let mut his = [false; 256];
        let mut ours = [false; 256];
        // Requested in the greeting: the client's agreement needs no answer, its refusal
        // (WONT/DONT) turns them off again.
        his[usize::from(OPT_NAWS)] = true;
        ours[usize::from(OPT_ECHO)] = true;
        ours[usize::from(OPT_SGA)] = true;
        Self {
            state: State::Data,
            his,
            ours,
            sub: Vec::new(),
        }
    }

    /// Decode `bytes` from the client: data goes to `input`, negotiation answers to `reply`.
    /// Returns the last window size (cols, rows) the client reported, if any.
    pub fn decode(
        &mut self,
        bytes: &[u8],
        input: &mut VecDeque<u8>,
        reply: &mut Vec<u8>,
    ) -> Option<(u16, u16)> {
        let mut size = None;
        for &b in bytes {
            self.state = match (self.state, b) {
                (State::Data | State::Cr, IAC) => State::Iac,
                (State::Cr, 0 | b'\n') => State::Data,
                (State::Data | State::Cr, b'\r') => {
                    input.push_back(b'\r');
                    State::Cr
                }
                (State::Data | State::Cr, _) => {
                    input.push_back(b);
                    State::Data
                }
                (State::Iac, IAC) => {
                    input.push_back(IAC);
                    State::Data
                }
                (State::Iac, WILL | WONT | DO | DONT) => State::Option(b),
                (State::Iac, SB) => {
                    self.sub.clear();
                    State::Sub
                }
                // NOP, GA, AYT, BRK...: nothing a console needs.
                (State::Iac, _) => State::Data,
                (State::Option(verb), option) => {
                    self.negotiate(verb, option, reply);
                    State::Data
                }
                (State::Sub, IAC) => State::SubIac,
                (State::Sub, _) => {
                    self.push_sub(b);
                    State::Sub
                }
                (State::SubIac, IAC) => {
                    self.push_sub(IAC);
                    State::Sub
                }
                (State::SubIac, SE) => {
                    if let Some(s) = self.window_size() {
                        size = Some(s);
                    }
                    State::Data
                }
                // A malformed subnegotiation: drop it and carry on with data.
                (State::SubIac, _) => State::Data,
            };
        }
        size
    }

    fn push_sub(&mut self, b: u8) {
        if self.sub.len() < MAX_SUB {
            self.sub.push(b);
        }
    }

    /// The window size in a finished `SB NAWS` subnegotiation; 0 (unknown) is ignored.
    fn window_size(&self) -> Option<(u16, u16)> {
        let [OPT_NAWS, c1, c0, r1, r0] = self.sub[..] else {
            return None;
        };
        if !self.his[usize::from(OPT_NAWS)] {
            return None;
        }
        let size = (u16::from_be_bytes([c1, c0]), u16::from_be_bytes([r1, r0]));
        (size.0 != 0 && size.1 != 0).then_some(size)
    }

    /// RFC 1143 in short: a request to enable an option that is off is agreed to (supported)
    /// or refused; a request to disable one that is on is acknowledged; a request that would
    /// not change the state gets no answer.
    fn negotiate(&mut self, verb: u8, option: u8, reply: &mut Vec<u8>) {
        let (state, supported, agree, refuse) = match verb {
            WILL | WONT => (&mut self.his, option == OPT_NAWS, DO, DONT),
            DO | DONT => (
                &mut self.ours,
                matches!(option, OPT_ECHO | OPT_SGA),
                WILL,
                WONT,
            ),
            _ => return,
        };
        let on = &mut state[usize::from(option)];
        let answer = match (verb == WILL || verb == DO, *on) {
            (true, true) | (false, false) => return,
            (true, false) if supported => {
                *on = true;
                agree
            }
            (true, false) => refuse,
            (false, true) => {
                *on = false;
                refuse
            }
        };
        reply.extend_from_slice(&[IAC, answer, option]);
    }
}

/// Guest output as telnet data: 0xFF doubled.
pub fn escape(data: &[u8]) -> Cow<'_, [u8]> {
    if !data.contains(&IAC) {
        return Cow::Borrowed(data);
    }
    let mut out = Vec::with_capacity(data.len() + 16);
    for &b in data {
        out.push(b);
        if b == IAC {
            out.push(IAC);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(t: &mut Telnet, bytes: &[u8]) -> (Vec<u8>, Vec<u8>, Option<(u16, u16)>) {
        let mut input = VecDeque::new();
        let mut reply = Vec::new();
        let size = t.decode(bytes, &mut input, &mut reply);
        (input.into(), reply, size)
    }

    #[test]
    fn data_passes_with_iac_unescaped_and_nvt_line_ends_folded() {
        let mut t = Telnet::new();
        let (input, reply, size) = decode(&mut t, b"ls\r\0a\xff\xffb\r\nc\rd");
        assert_eq!(input, b"ls\ra\xffb\rc\rd");
        assert!(reply.is_empty());
        assert_eq!(size, None);
    }

    #[test]
    fn window_size_split_across_reads_with_an_escaped_255() {
        let mut t = Telnet::new();
        let msg = [b'x', IAC, SB, OPT_NAWS, 0, 255, 255, 0, 40, IAC, SE, b'y'];
        let mut input = VecDeque::new();
        let mut reply = Vec::new();
        let mut size = None;
        for chunk in msg.chunks(1) {
            size = t.decode(chunk, &mut input, &mut reply).or(size);
        }
        assert_eq!(size, Some((255, 40)));
        assert_eq!(Vec::from(input), b"xy");
        assert!(reply.is_empty());
    }

    #[test]
    fn negotiation_answers_changes_only_and_refuses_the_rest() {
        let mut t = Telnet::new();
        // Agreement to what the greeting asked: no answer.
        let (_, reply, _) = decode(&mut t, &[IAC, WILL, OPT_NAWS, IAC, DO, OPT_ECHO]);
        assert!(reply.is_empty());
        // Unknown options are refused.
        let (_, reply, _) = decode(&mut t, &[IAC, WILL, 24, IAC, DO, 34]);
        assert_eq!(reply, [IAC, DONT, 24, IAC, WONT, 34]);
        // The client turning NAWS off is acknowledged once; its sizes no longer count.
        let (_, reply, _) = decode(&mut t, &[IAC, WONT, OPT_NAWS, IAC, WONT, OPT_NAWS]);
        assert_eq!(reply, [IAC, DONT, OPT_NAWS]);
        let (_, _, size) = decode(&mut t, &[IAC, SB, OPT_NAWS, 0, 80, 0, 24, IAC, SE]);
        assert_eq!(size, None);
        // And back on.
        let (_, reply, _) = decode(&mut t, &[IAC, WILL, OPT_NAWS]);
        assert_eq!(reply, [IAC, DO, OPT_NAWS]);
        let (_, _, size) = decode(&mut t, &[IAC, SB, OPT_NAWS, 0, 80, 0, 24, IAC, SE]);
        assert_eq!(size, Some((80, 24)));
    }

    #[test]
    fn hostile_subnegotiations_are_bounded_and_dropped() {
        let mut t = Telnet::new();
        let mut msg = vec![IAC, SB, OPT_NAWS];
        msg.extend(std::iter::repeat_n(7u8, 10_000));
        msg.extend_from_slice(&[IAC, SE, b'k']);
        let (input, _, size) = decode(&mut t, &msg);
        assert_eq!(size, None);
        assert_eq!(input, b"k");
        assert!(t.sub.len() <= MAX_SUB);
        // Zero means "unknown" and an IAC followed by junk ends the subnegotiation.
        let (input, _, size) = decode(&mut t, &[IAC, SB, OPT_NAWS, 0, 0, 0, 0, IAC, SE, b'z']);
        assert_eq!((input, size), (b"z".to_vec(), None));
        let (input, _, _) = decode(&mut t, &[IAC, SB, OPT_NAWS, 1, IAC, b'q', b'r']);
        assert_eq!(input, b"r");
    }

    #[test]
    fn output_doubles_iac_only() {
        assert!(matches!(escape(b"plain"), Cow::Borrowed(_)));
        assert_eq!(&*escape(b"a\xffb\xff"), b"a\xff\xffb\xff\xff");
    }
}
