//! The VM life cycle as a pure state machine.
//!
//! The VM thread asks [`transition`] before it acts on a request: a request that does not fit
//! the current state is refused with a [`StateError`] saying why, and nothing is touched. When
//! the action then succeeds, the VM thread records the state [`transition`] returned. Keeping
//! the rules here, free of KVM, lets every pair (state, action) be tested.
//!
//! ```text
//!   (none) --create--> Created --boot--> Running <--pause/resume--> Paused
//!                                         |  ^                          |
//!                              shutdown   |  | boot                     | shutdown
//!                                         v  |                          |
//!                                        Shutdown <---------------------+
//!   delete: any VM -> (none)     reboot: Running/Paused -> Running
//! ```

use std::fmt;

/// State of a created VM. "No VM" is `None` in the `Option<VmState>` the VM thread keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VmState {
    /// Configured, never booted.
    Created,
    /// vCPUs are running the guest.
    Running,
    /// vCPUs are stopped outside KVM_RUN; the guest clock is frozen.
    Paused,
    /// The guest was stopped by `vm.shutdown`; the configuration is kept and can boot again.
    Shutdown,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmState::Created => "created",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Shutdown => "shut down",
        })
    }
}

/// What a request asks to do to the VM (requests about the VMM itself, ping and VMM
/// shutdown, are valid in every state and do not appear here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmAction {
    /// `vm.create`: store a configuration.
    Create,
    /// `vm.boot`: build the VM and start its vCPUs.
    Boot,
    /// `vm.delete`: stop the VM if it runs and forget its configuration.
    Delete,
    /// `vm.info`: report configuration and state.
    Info,
    /// `vm.pause`: stop every vCPU.
    Pause,
    /// `vm.resume`: let paused vCPUs run.
    Resume,
    /// `vm.reboot`: restart the guest in the same process.
    Reboot,
    /// `vm.shutdown`: stop the guest, keep the configuration.
    Shutdown,
    /// `vm.resize`: change the vCPU count or RAM size.
    Resize,
}

impl fmt::Display for VmAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmAction::Create => "create",
            VmAction::Boot => "boot",
            VmAction::Delete => "delete",
            VmAction::Info => "query",
            VmAction::Pause => "pause",
            VmAction::Resume => "resume",
            VmAction::Reboot => "reboot",
            VmAction::Shutdown => "shut down",
            VmAction::Resize => "resize",
        })
    }
}

/// Why a request does not fit the current state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The request needs a VM and none was created.
    #[error("no VM has been created (send vm.create first)")]
    NoVm,
    /// `vm.create` while a VM exists.
    #[error("a VM is already created (state: {0}); send vm.delete first")]
    AlreadyCreated(VmState),
    /// `vm.boot` while the VM runs or is paused.
    #[error("the VM is already booted (state: {0})")]
    AlreadyBooted(VmState),
    /// `vm.pause` while the VM is not running.
    #[error("cannot pause: the VM is {0}, not running")]
    NotRunning(VmState),
    /// `vm.resume` while the VM is not paused.
    #[error("cannot resume: the VM is {0}, not paused")]
    NotPaused(VmState),
    /// `vm.reboot` or `vm.shutdown` while the guest is not booted.
    #[error("cannot {action}: the VM is {state}, not booted")]
    NotBooted {
        /// What was asked.
        action: VmAction,
        /// The state it was asked in.
        state: VmState,
    },
    /// `vm.resize` while the VM is paused (hot-plug needs the guest to answer).
    #[error("cannot resize: the VM is paused (resume it first)")]
    ResizePaused,
}

/// The state after `action` in `state`, or why `action` is not possible now.
///
/// `Ok(None)` means "no VM" (after `vm.delete`). Queries return the state unchanged.
pub fn transition(state: Option<VmState>, action: VmAction) -> Result<Option<VmState>, StateError> {
    use VmAction as A;
    use VmState as S;
    let Some(s) = state else {
        return match action {
            A::Create => Ok(Some(S::Created)),
            _ => Err(StateError::NoVm),
        };
    };
    let next = match (action, s) {
        (A::Create, _) => return Err(StateError::AlreadyCreated(s)),
        (A::Delete, _) => return Ok(None),
        (A::Info, _) => s,
        (A::Boot, S::Created | S::Shutdown) => S::Running,
        (A::Boot, S::Running | S::Paused) => return Err(StateError::AlreadyBooted(s)),
        (A::Pause, S::Running) => S::Paused,
        (A::Pause, _) => return Err(StateError::NotRunning(s)),
        (A::Resume, S::Paused) => S::Running,
        (A::Resume, _) => return Err(StateError::NotPaused(s)),
        (A::Reboot, S::Running | S::Paused) => S::Running,
        (A::Shutdown, S::Running | S::Paused) => S::Shutdown,
        (A::Reboot | A::Shutdown, S::Created | S::Shutdown) => {
            return Err(StateError::NotBooted { action, state: s })
        }
        // Before boot a resize only changes the configuration the next boot uses.
        (A::Resize, S::Paused) => return Err(StateError::ResizePaused),
        (A::Resize, _) => s,
    };
    Ok(Some(next))
}

/// Whether the VM has vCPUs and devices in this state (what `vm.delete` must tear down).
pub fn is_booted(state: Option<VmState>) -> bool {
    matches!(state, Some(VmState::Running | VmState::Paused))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACTIONS: [VmAction; 9] = [
        VmAction::Create,
        VmAction::Boot,
        VmAction::Delete,
        VmAction::Info,
        VmAction::Pause,
        VmAction::Resume,
        VmAction::Reboot,
        VmAction::Shutdown,
        VmAction::Resize,
    ];
    const STATES: [Option<VmState>; 5] = [
        None,
        Some(VmState::Created),
        Some(VmState::Running),
        Some(VmState::Paused),
        Some(VmState::Shutdown),
    ];

    /// The whole table: every state against every action.
    #[test]
    fn every_state_and_action() {
        use VmAction as A;
        use VmState as S;
        let expected = |state: Option<VmState>, action: VmAction| -> Option<Option<VmState>> {
            Some(match (state, action) {
                (None, A::Create) => Some(S::Created),
                (None, _) => return None,
                (Some(_), A::Create) => return None,
                (Some(_), A::Delete) => None,
                (Some(s), A::Info) => Some(s),
                (Some(S::Created | S::Shutdown), A::Boot) => Some(S::Running),
                (Some(S::Running), A::Pause) => Some(S::Paused),
                (Some(S::Paused), A::Resume) => Some(S::Running),
                (Some(S::Running | S::Paused), A::Reboot) => Some(S::Running),
                (Some(S::Running | S::Paused), A::Shutdown) => Some(S::Shutdown),
                (Some(s @ (S::Created | S::Running | S::Shutdown)), A::Resize) => Some(s),
                _ => return None,
            })
        };
        for state in STATES {
            for action in ACTIONS {
                let got = transition(state, action);
                match expected(state, action) {
                    Some(next) => assert_eq!(got, Ok(next), "{state:?} {action:?}"),
                    None => assert!(got.is_err(), "{state:?} {action:?} gave {got:?}"),
                }
            }
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let msg = |s, a| transition(s, a).unwrap_err().to_string();
        assert_eq!(
            msg(None, VmAction::Boot),
            "no VM has been created (send vm.create first)"
        );
        assert_eq!(
            msg(Some(VmState::Running), VmAction::Create),
            "a VM is already created (state: running); send vm.delete first"
        );
        assert_eq!(
            msg(Some(VmState::Created), VmAction::Pause),
            "cannot pause: the VM is created, not running"
        );
        assert_eq!(
            msg(Some(VmState::Running), VmAction::Resume),
            "cannot resume: the VM is running, not paused"
        );
        assert_eq!(
            msg(Some(VmState::Paused), VmAction::Boot),
            "the VM is already booted (state: paused)"
        );
        assert_eq!(
            msg(Some(VmState::Shutdown), VmAction::Reboot),
            "cannot reboot: the VM is shut down, not booted"
        );
        assert_eq!(
            msg(Some(VmState::Created), VmAction::Shutdown),
            "cannot shut down: the VM is created, not booted"
        );
    }

    /// A refused request leaves the state as it was (the VM thread only records `Ok`).
    #[test]
    fn a_life_cycle() {
        let mut s = None;
        for (action, ok) in [
            (VmAction::Boot, false),
            (VmAction::Create, true),
            (VmAction::Create, false),
            (VmAction::Resume, false),
            (VmAction::Boot, true),
            (VmAction::Pause, true),
            (VmAction::Pause, false),
            (VmAction::Resume, true),
            (VmAction::Reboot, true),
            (VmAction::Shutdown, true),
            (VmAction::Shutdown, false),
            (VmAction::Boot, true),
            (VmAction::Delete, true),
            (VmAction::Delete, false),
        ] {
            match transition(s, action) {
                Ok(next) => {
                    assert!(ok, "{action:?} in {s:?} should be refused");
                    s = next;
                }
                Err(e) => assert!(!ok, "{action:?} in {s:?} refused: {e}"),
            }
        }
        assert_eq!(s, None);
    }

    #[test]
    fn booted_states() {
        assert!(!is_booted(None));
        assert!(!is_booted(Some(VmState::Created)));
        assert!(is_booted(Some(VmState::Running)));
        assert!(is_booted(Some(VmState::Paused)));
        assert!(!is_booted(Some(VmState::Shutdown)));
    }
}
