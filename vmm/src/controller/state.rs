//! The controller's lifecycle as one checked state ([`RunState`]): every
//! request names the state it wants, and [`valid_transition`] alone decides
//! whether that is allowed from the current one (the model is Cloud
//! Hypervisor's `VmState::valid_transition`).

use super::ControlError;

/// Where a running VM stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// The vCPUs run.
    Running,
    /// Paused on request.
    Paused,
    /// Paused because a page source failed (the page was not zero-filled);
    /// a resume means the source was repaired.
    MemoryFault,
    /// Outgoing migration before the switchover, while the VM runs: the
    /// connections open, then pre-copy rounds if any.
    Precopy,
    /// The same, paused on request.
    PrecopyPaused,
    /// Outgoing migration after the switchover: the destination may run the
    /// VM, so it stays paused here unless the migration fails.
    Postcopy,
    /// Incoming migration whose source is lost: paused, and it must stay so
    /// (its memory is incomplete) until the source is recovered.
    SourceLost,
    /// The external page-fault handler is gone: paused, nobody serves its
    /// faults, until a new handler is attached (or the grace ends the run).
    HandlerLost,
    /// The run ended.
    Ended,
}

impl RunState {
    /// Whether the vCPUs are paused in this state.
    pub fn paused(self) -> bool {
        !matches!(self, RunState::Running | RunState::Precopy)
    }
}

/// Whether the controller may go from `from` to `to`; the error says why
/// not, in the words a user needs.
pub fn valid_transition(from: RunState, to: RunState) -> Result<(), ControlError> {
    use RunState::*;
    let ok = match (from, to) {
        // Any run may end, however it stands.
        (_, Ended) if from != Ended => true,
        (Running, Paused) | (Precopy, PrecopyPaused) => true,
        (Paused | MemoryFault, Running) | (PrecopyPaused, Precopy) => true,
        // A failing source pauses whatever runs (a post-copy source or a
        // lost destination is paused already and stays in its state).
        (Running | Paused | Precopy | PrecopyPaused, MemoryFault) => true,
        // Migrations start from a VM that runs or is paused; a failed one
        // leaves the VM as it was (running or paused).
        (Running, Precopy) | (Paused, PrecopyPaused) => true,
        (Precopy, Running) | (PrecopyPaused, Paused) => true,
        (Running | Paused | Precopy | PrecopyPaused, Postcopy) => true,
        (Postcopy, Paused) => true,
        // A destination loses its source, and gets it back.
        (Running | Paused | MemoryFault, SourceLost) => true,
        (SourceLost, Paused) => true,
        // An external handler dies, and a new one is attached (the VM goes
        // to Paused, then back to running if it ran).
        (Running | Paused, HandlerLost) => true,
        (HandlerLost, Paused) => true,
        _ => false,
    };
    if ok {
        return Ok(());
    }
    Err(match (from, to) {
        (Ended, _) => ControlError::Ended,
        (
            Paused | PrecopyPaused | MemoryFault | Postcopy | SourceLost | HandlerLost,
            Paused | PrecopyPaused,
        ) => ControlError::AlreadyPaused,
        (Running | Precopy, Running | Precopy) => ControlError::NotPaused,
        (Postcopy, _) => ControlError::Migrating,
        (SourceLost, _) => ControlError::SourceLost,
        (HandlerLost, _) => ControlError::HandlerLost,
        (Precopy | PrecopyPaused, Precopy | PrecopyPaused | Postcopy) => ControlError::MigrationRunning,
        (MemoryFault, _) => ControlError::MemoryFault,
        _ => ControlError::InvalidTransition { from, to },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use RunState::*;

    const ALL: [RunState; 9] = [
        Running,
        Paused,
        MemoryFault,
        Precopy,
        PrecopyPaused,
        Postcopy,
        SourceLost,
        HandlerLost,
        Ended,
    ];

    #[test]
    fn requests_get_the_errors_users_read() {
        assert!(matches!(
            valid_transition(Paused, Paused),
            Err(ControlError::AlreadyPaused)
        ));
        assert!(matches!(
            valid_transition(Running, Running),
            Err(ControlError::NotPaused)
        ));
        assert!(matches!(
            valid_transition(Postcopy, Running),
            Err(ControlError::Migrating)
        ));
        assert!(matches!(
            valid_transition(SourceLost, Running),
            Err(ControlError::SourceLost)
        ));
        assert!(matches!(
            valid_transition(Ended, Running),
            Err(ControlError::Ended)
        ));
        assert!(matches!(valid_transition(Ended, Ended), Err(ControlError::Ended)));
        assert!(matches!(valid_transition(Precopy, Postcopy), Ok(())));
        assert!(matches!(valid_transition(PrecopyPaused, Precopy), Ok(())));
        assert!(matches!(valid_transition(MemoryFault, Running), Ok(())));
        assert!(matches!(valid_transition(SourceLost, Paused), Ok(())));
    }

    #[test]
    fn a_lost_handler_pauses_and_only_a_new_one_takes_the_vm_out() {
        assert!(valid_transition(Running, HandlerLost).is_ok());
        assert!(valid_transition(Paused, HandlerLost).is_ok());
        assert!(valid_transition(HandlerLost, Paused).is_ok());
        assert!(matches!(
            valid_transition(HandlerLost, Running),
            Err(ControlError::HandlerLost)
        ));
        assert!(matches!(
            valid_transition(HandlerLost, Precopy),
            Err(ControlError::HandlerLost)
        ));
        for s in [
            MemoryFault,
            Precopy,
            PrecopyPaused,
            Postcopy,
            SourceLost,
            HandlerLost,
            Ended,
        ] {
            assert!(valid_transition(s, HandlerLost).is_err(), "{s:?}");
        }
        assert!(HandlerLost.paused());
        let e = valid_transition(HandlerLost, Running).unwrap_err().to_string();
        assert!(e.contains("attach-handler"), "{e}");
    }

    #[test]
    fn every_state_can_end_and_nothing_leaves_the_end() {
        for s in ALL {
            assert_eq!(valid_transition(s, Ended).is_ok(), s != Ended, "{s:?}");
            for t in ALL {
                if s == Ended {
                    assert!(valid_transition(s, t).is_err(), "{s:?} -> {t:?}");
                }
            }
        }
    }

    #[test]
    fn paused_states_are_paused() {
        for s in ALL {
            assert_eq!(s.paused(), !matches!(s, Running | Precopy), "{s:?}");
        }
    }
}
