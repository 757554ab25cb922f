//! Access: token → identity → the one restaurant a request or socket is
//! about. One function for a new socket, an HTTP call and a token refresh
//! on an open socket, so a refresh authorizes exactly like a connect; and
//! the batched membership re-check that ends sockets of removed members.

use std::collections::HashSet;

use uuid::Uuid;

use crate::auth::{AuthError, Identity, Verifier};
use crate::db::Database;
use crate::domain::RestaurantId;

/// Why access to a restaurant was refused; http and session turn it into a
/// status code or a close code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessError {
    Auth(AuthError),
    BadRequest(String),
    Forbidden(String),
    Unavailable(String),
    /// A refresh token for another user or another restaurant's claim.
    Mismatch(String),
}

/// A token admitted for one restaurant.
#[derive(Debug, Clone)]
pub struct Grant {
    pub identity: Identity,
    pub restaurant: RestaurantId,
    /// The restaurant came from `restaurant_members` (no claim in the
    /// token): the socket must be re-checked while it stays open.
    pub via_membership: bool,
}

#[derive(Clone)]
pub struct Access {
    pub verifier: Verifier,
    pub db: Option<Database>,
}

impl Access {
    pub fn new(verifier: Verifier, db: Option<Database>) -> Access {
        Access { verifier, db }
    }

    /// Verify `token`; the restaurant is its claim (which must match
    /// `requested` if given), else, with a database, the caller's one
    /// membership or the `requested` one among several.
    pub async fn resolve(
        &self,
        token: Option<&str>,
        requested: Option<RestaurantId>,
    ) -> Result<Grant, AccessError> {
        let identity = self.verify(token).await?;
        self.restaurant_for(identity, requested).await
    }

    async fn verify(&self, token: Option<&str>) -> Result<Identity, AccessError> {
        let token = token.ok_or(AccessError::Auth(AuthError::Missing))?;
        self.verifier.verify(token).await.map_err(|e| {
            metrics::counter!("orders_gateway_auth_failures_total", "reason" => e.reason())
                .increment(1);
            AccessError::Auth(e)
        })
    }

    async fn restaurant_for(
        &self,
        identity: Identity,
        requested: Option<RestaurantId>,
    ) -> Result<Grant, AccessError> {
        if let Some(claimed) = identity.restaurant {
            return match requested {
                Some(r) if r != claimed => Err(AccessError::Forbidden(
                    "token is not valid for that restaurant".into(),
                )),
                _ => Ok(Grant {
                    identity,
                    restaurant: claimed,
                    via_membership: false,
                }),
            };
        }
        let Some(db) = &self.db else {
            return Err(AccessError::Forbidden("token names no restaurant".into()));
        };
        // Membership is per user: a token without `sub` (an anon key, a
        // service token) names nobody to look up.
        if identity.user_id.is_empty() {
            return Err(AccessError::Forbidden(
                "token names no restaurant and no user (sub)".into(),
            ));
        }
        let memberships = db.memberships(&identity.user_id).await.map_err(|e| {
            tracing::warn!(error = %e, "membership lookup failed");
            AccessError::Unavailable("membership lookup unavailable, retry".into())
        })?;
        let restaurant = match (memberships.as_slice(), requested) {
            ([], _) => {
                return Err(AccessError::Forbidden(
                    "not a member of any restaurant".into(),
                ));
            }
            ([only], None) => *only,
            (_, None) => {
                return Err(AccessError::BadRequest(
                    "member of several restaurants: restaurant_id is required".into(),
                ));
            }
            (all, Some(r)) if all.contains(&r) => r,
            (_, Some(_)) => {
                return Err(AccessError::Forbidden(
                    "not a member of that restaurant".into(),
                ));
            }
        };
        Ok(Grant {
            identity,
            restaurant,
            via_membership: true,
        })
    }

    /// A replacement token for an open socket: admitted exactly like a new
    /// connection asking for the same restaurant (claim, or membership
    /// looked up again), and for the same user. `Mismatch`: another user or
    /// another restaurant's claim; `Forbidden`: this user is no longer a
    /// member of the restaurant.
    pub async fn refresh(
        &self,
        token: &str,
        user_id: &str,
        restaurant: RestaurantId,
    ) -> Result<Grant, AccessError> {
        let identity = self.verify(Some(token)).await?;
        if identity.user_id != user_id {
            return Err(AccessError::Mismatch(
                "the new token is for another user".into(),
            ));
        }
        if identity.restaurant.is_some_and(|c| c != restaurant) {
            return Err(AccessError::Mismatch(
                "the new token is for another restaurant".into(),
            ));
        }
        self.restaurant_for(identity, Some(restaurant)).await
    }

    /// Which of `pairs` (user, restaurant) are still in
    /// `restaurant_members`. Without a database every pair stands.
    pub async fn still_members(
        &self,
        pairs: &[(Uuid, RestaurantId)],
    ) -> Result<HashSet<(Uuid, RestaurantId)>, sqlx::Error> {
        match &self.db {
            None => Ok(pairs.iter().cloned().collect()),
            Some(db) => db.present_memberships(pairs).await,
        }
    }
}
