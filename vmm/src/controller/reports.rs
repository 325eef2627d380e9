//! What the guest tells the controller, kept within bounds (a guest can send
//! without limit): workload reports and rejected requests. Its state (the
//! reports) persists with the VM, so a restored or migrated run is verified
//! with the reports sent before the save.

use crate::state::ControllerState;
use abi::pv::WorkloadReport;
use persist::Persist;
use std::convert::Infallible;

/// Reports kept from the guest (a guest sending more is misbehaving).
pub const MAX_REPORTS: usize = 4 * abi::boot::MAX_VCPUS as usize;
/// Rejected guest requests kept as messages; later ones are only counted.
pub const MAX_BAD_REQUESTS: usize = 100;

/// See the module documentation.
#[derive(Debug, Default)]
pub struct GuestReports {
    reports: Vec<WorkloadReport>,
    bad_requests: Vec<String>,
    bad_requests_dropped: u64,
}

impl GuestReports {
    /// Keeps a workload report; past [`MAX_REPORTS`] it is a bad request.
    pub fn report(&mut self, r: WorkloadReport) {
        if self.reports.len() < MAX_REPORTS {
            self.reports.push(r);
        } else {
            self.bad_request(format!(
                "workload report dropped: more than {MAX_REPORTS} reports"
            ));
        }
    }

    /// Keeps a rejected guest request's message (the first ones only).
    pub fn bad_request(&mut self, msg: String) {
        if self.bad_requests.len() < MAX_BAD_REQUESTS {
            tracing::warn!("{msg}");
            self.bad_requests.push(msg);
        } else {
            self.bad_requests_dropped += 1;
        }
    }

    /// The reports and the rejected requests, for the run's outcome.
    pub fn take(&mut self) -> (Vec<WorkloadReport>, Vec<String>) {
        let mut reports = std::mem::take(&mut self.reports);
        reports.sort_by_key(|r| r.cpu);
        let mut bad = std::mem::take(&mut self.bad_requests);
        if self.bad_requests_dropped > 0 {
            bad.push(format!("... and {} more", self.bad_requests_dropped));
        }
        (reports, bad)
    }
}

impl Persist for GuestReports {
    type State = ControllerState;
    type ConstructorArgs = ();
    type Error = Infallible;

    fn save(&self) -> Result<ControllerState, Infallible> {
        Ok(ControllerState {
            reports: self.reports.clone(),
        })
    }

    fn restore((): (), state: &ControllerState) -> Result<GuestReports, Infallible> {
        Ok(GuestReports {
            reports: state.reports.iter().take(MAX_REPORTS).copied().collect(),
            ..GuestReports::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_and_bad_requests_are_bounded_and_reports_persist() {
        let mut g = GuestReports::default();
        for cpu in 0..(MAX_REPORTS as u32 + 5) {
            g.report(WorkloadReport {
                cpu,
                ..Default::default()
            });
        }
        for i in 0..MAX_BAD_REQUESTS + 7 {
            g.bad_request(format!("bad {i}"));
        }
        let saved = g.save().unwrap();
        assert_eq!(saved.reports.len(), MAX_REPORTS);
        let back = GuestReports::restore((), &saved).unwrap();
        assert_eq!(back.reports, saved.reports);
        let (reports, bad) = g.take();
        assert_eq!(reports.len(), MAX_REPORTS);
        assert_eq!(bad.len(), MAX_BAD_REQUESTS + 1);
        assert_eq!(bad.last().map(String::as_str), Some("... and 12 more"));
    }
}
