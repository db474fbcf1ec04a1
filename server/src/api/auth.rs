//! Bearer-token access control. Every call but the health checks must
//! carry `authorization: Bearer <token>`; the check runs on the headers,
//! before the service decodes any message, and compares in constant time.

use tonic::service::Interceptor;

pub use crate::token::AuthToken;

/// Refuses calls without the token with UNAUTHENTICATED; lets every call
/// through when no token is configured.
#[derive(Clone, Debug, Default)]
pub struct Authenticate(pub Option<AuthToken>);

impl Interceptor for Authenticate {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let Some(token) = &self.0 else {
            return Ok(req);
        };
        let refuse = |reason: &'static str, message: &str| {
            crate::metrics::unauthenticated(reason);
            Err(tonic::Status::unauthenticated(message))
        };
        let Some(value) = req.metadata().get(paramd_proto::transport::AUTHORIZATION) else {
            return refuse(
                "missing",
                "this server needs `authorization: Bearer <token>` metadata",
            );
        };
        let value = value.as_bytes();
        let scheme = b"bearer ";
        if value.len() < scheme.len() || !value[..scheme.len()].eq_ignore_ascii_case(scheme) {
            return refuse("scheme", "authorization metadata must be `Bearer <token>`");
        }
        if !token.matches(&value[scheme.len()..]) {
            return refuse("wrong_token", "wrong bearer token");
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(auth: &mut Authenticate, header: Option<&str>) -> Result<(), tonic::Code> {
        let mut req = tonic::Request::new(());
        if let Some(h) = header {
            req.metadata_mut()
                .insert("authorization", h.parse().expect("ascii header"));
        }
        auth.call(req).map(|_| ()).map_err(|s| s.code())
    }

    #[test]
    fn only_the_token_passes() {
        let mut auth = Authenticate(Some(AuthToken::new("s3cret")));
        assert_eq!(call(&mut auth, Some("Bearer s3cret")), Ok(()));
        assert_eq!(call(&mut auth, Some("bearer s3cret")), Ok(()));
        for bad in [
            None,
            Some("Bearer s3cre"),
            Some("Bearer s3cret2"),
            Some("s3cret"),
            Some("Basic s3cret"),
        ] {
            assert_eq!(
                call(&mut auth, bad),
                Err(tonic::Code::Unauthenticated),
                "{bad:?}"
            );
        }
        let mut open = Authenticate(None);
        assert_eq!(call(&mut open, None), Ok(()));
    }

    #[test]
    fn the_token_is_never_printed() {
        let auth = Authenticate(Some(AuthToken::new("s3cret")));
        assert!(!format!("{auth:?}").contains("s3cret"));
    }
}
