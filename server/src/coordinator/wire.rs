//! The round's types on the wire, both directions, in one place: a
//! `Decision` as the `RoundOutcome` workers and shards receive, a shard's
//! `Report` and the coordinator's `Members` as the peer calls carry them.

use paramd_proto::v1 as pb;

use super::{Decision, LoadTicket, Members, Report};
use crate::error::{Error, Result};

impl From<&Decision> for pb::RoundOutcome {
    fn from(d: &Decision) -> pb::RoundOutcome {
        pb::RoundOutcome {
            round: d.round,
            step: d.step,
            skipped: d.skipped,
            grad_norm: d.grad_norm,
            clip_coefficient: d.clip_coefficient,
            lr: d.lr.clone(),
            loaded_state: d.loaded_state,
            participants: d.participants,
        }
    }
}

impl From<pb::RoundOutcome> for Decision {
    fn from(d: pb::RoundOutcome) -> Decision {
        Decision {
            round: d.round,
            skipped: d.skipped,
            grad_norm: d.grad_norm,
            clip_coefficient: d.clip_coefficient,
            lr: d.lr,
            step: d.step,
            loaded_state: d.loaded_state,
            participants: d.participants,
        }
    }
}

impl Report {
    /// The Report call of shard `shard` for round `round` of `job`.
    pub fn to_request(&self, job: &str, round: u64, shard: usize) -> pb::ReportRequest {
        pb::ReportRequest {
            job: job.to_owned(),
            round,
            shard: shard as u32,
            chunks: self.sums.iter().map(|&(c, _)| c as u64).collect(),
            sum_squares: self.sums.iter().map(|&(_, s)| s).collect(),
            non_finite: self.non_finite,
            load: self.load.map_or(0, |l| l.id),
            load_step: self.load.map_or(0, |l| l.step),
        }
    }

    /// The report a Report call carries, refused if its chunk ids and sums
    /// do not pair up.
    pub fn from_request(r: &pb::ReportRequest) -> Result<Report> {
        if r.chunks.len() != r.sum_squares.len() {
            return Err(Error::Invalid(format!(
                "{} chunk ids but {} sums of squares",
                r.chunks.len(),
                r.sum_squares.len()
            )));
        }
        Ok(Report {
            sums: r
                .chunks
                .iter()
                .map(|&c| c as usize)
                .zip(r.sum_squares.iter().copied())
                .collect(),
            non_finite: r.non_finite,
            load: (r.load != 0).then_some(LoadTicket {
                id: r.load,
                step: r.load_step,
            }),
        })
    }
}

impl From<Members> for pb::MembersResponse {
    fn from(m: Members) -> pb::MembersResponse {
        pb::MembersResponse {
            round: m.round,
            workers: m.workers,
            dropped: m.dropped,
        }
    }
}

impl From<pb::MembersResponse> for Members {
    fn from(m: pb::MembersResponse) -> Members {
        Members {
            round: m.round,
            workers: m.workers,
            dropped: m.dropped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_round_types_round_trip() {
        let d = Decision {
            round: 3,
            skipped: false,
            grad_norm: 1.5,
            clip_coefficient: 0.5,
            lr: vec![0.1, 0.01],
            step: 2,
            loaded_state: 9,
            participants: 3,
        };
        assert_eq!(Decision::from(pb::RoundOutcome::from(&d)), d);
        let report = Report {
            sums: vec![(0, 1.0), (7, 2.5)],
            non_finite: true,
            load: Some(LoadTicket { id: 9, step: 40 }),
        };
        let back = Report::from_request(&report.to_request("j", 3, 1)).expect("pairs up");
        assert_eq!(back.sums, report.sums);
        assert_eq!(back.non_finite, report.non_finite);
        assert_eq!(back.load, report.load);
        let none = Report::default().to_request("j", 3, 1);
        assert_eq!(Report::from_request(&none).expect("empty").load, None);
        let m = Members {
            round: 3,
            workers: vec![0, 2],
            dropped: vec![1],
        };
        assert_eq!(Members::from(pb::MembersResponse::from(m.clone())), m);
        let mut bad = report.to_request("j", 3, 1);
        bad.sum_squares.pop();
        assert!(Report::from_request(&bad).is_err());
    }
}
