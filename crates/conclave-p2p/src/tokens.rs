//! The sender's one-time tokens: a small state machine with no I/O.
//!
//! Each token is `Ready` (may start or resume a transfer), `InUse` (one connection is
//! transferring with it) or `Done` (a receiver verified the whole file: never usable again).
//! A transfer that ends any other way puts its token back to `Ready`, so the receiver can
//! resume with the same token.

use subtle::{ConditionallySelectable, ConstantTimeEq};

/// Why a presented token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Unknown,
    Used,
    Busy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Ready,
    InUse,
    Done,
}

struct Entry {
    token: [u8; 32],
    state: State,
}

/// The registered tokens, indexed in registration order.
pub struct Tokens {
    entries: Vec<Entry>,
    max: usize,
}

/// Why a token could not be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllowError {
    Full,
    Duplicate,
}

impl Tokens {
    pub fn new(max: usize) -> Tokens {
        Tokens {
            entries: Vec::new(),
            max,
        }
    }

    /// Registers a token; returns its index.
    pub fn allow(&mut self, token: [u8; 32]) -> Result<usize, AllowError> {
        if self.find(&token).is_some() {
            return Err(AllowError::Duplicate);
        }
        if self.entries.len() >= self.max {
            return Err(AllowError::Full);
        }
        self.entries.push(Entry {
            token,
            state: State::Ready,
        });
        Ok(self.entries.len() - 1)
    }

    /// Looks the token up comparing every registered token in constant time, so the time taken
    /// says nothing about how close a guess came.
    fn find(&self, presented: &[u8; 32]) -> Option<usize> {
        let mut found = subtle::Choice::from(0);
        let mut index = 0u64;
        for (i, entry) in self.entries.iter().enumerate() {
            let eq = entry.token.ct_eq(presented);
            index = u64::conditional_select(&index, &(i as u64), eq);
            found |= eq;
        }
        if bool::from(found) {
            Some(index as usize)
        } else {
            None
        }
    }

    /// Claims the token for one connection.
    pub fn claim(&mut self, presented: &[u8; 32]) -> Result<usize, Refusal> {
        let index = self.find(presented).ok_or(Refusal::Unknown)?;
        let entry = &mut self.entries[index];
        match entry.state {
            State::Ready => {
                entry.state = State::InUse;
                Ok(index)
            }
            State::InUse => Err(Refusal::Busy),
            State::Done => Err(Refusal::Used),
        }
    }

    /// The claiming connection ended without a verified transfer: the token may be used again.
    pub fn release(&mut self, index: usize) {
        if let Some(entry) = self.entries.get_mut(index)
            && entry.state == State::InUse
        {
            entry.state = State::Ready;
        }
    }

    /// The receiver verified the file: the token is spent.
    pub fn complete(&mut self, index: usize) {
        if let Some(entry) = self.entries.get_mut(index) {
            entry.state = State::Done;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_resumes_until_completed_then_is_spent() {
        let mut t = Tokens::new(4);
        let a = t.allow([1; 32]).unwrap();
        assert_eq!(t.allow([1; 32]), Err(AllowError::Duplicate));
        assert_eq!(t.claim(&[2; 32]), Err(Refusal::Unknown));
        assert_eq!(t.claim(&[1; 32]), Ok(a));
        assert_eq!(t.claim(&[1; 32]), Err(Refusal::Busy));
        t.release(a);
        assert_eq!(t.claim(&[1; 32]), Ok(a));
        t.complete(a);
        t.release(a);
        assert_eq!(t.claim(&[1; 32]), Err(Refusal::Used));
    }

    #[test]
    fn the_table_is_bounded() {
        let mut t = Tokens::new(2);
        t.allow([1; 32]).unwrap();
        let b = t.allow([2; 32]).unwrap();
        assert_eq!(t.allow([3; 32]), Err(AllowError::Full));
        assert_eq!(t.claim(&[2; 32]), Ok(b));
    }
}
