#!/bin/sh
# Prints an HS256 dashboard token for the docker-compose stack's demo member,
# or with --url the live-board URL that carries it.
#
#   deploy/compose/dev-token.sh            # token
#   deploy/compose/dev-token.sh --url      # http://localhost:8080/?token=...
#
# Environment (defaults in brackets; JWT_SECRET must match the stack's):
#   JWT_SECRET     [the compose file's dev default]
#   SUB            [22222222-2222-2222-2222-222222222222] user id (restaurant_members)
#   RESTAURANT_ID  [11111111-1111-1111-1111-111111111111] put in the restaurant_id
#                  claim; set it empty to make the gateway look the membership up
#   TTL_SECONDS    [28800]
#   JWT_AUDIENCE, JWT_ISSUER  added as aud / iss when set
#   BOARD_URL      [http://localhost:8080/]
# Needs only sh and openssl.
set -eu
: "${JWT_SECRET:=dev-only-insecure-jwt-secret-change-me}"
: "${SUB:=22222222-2222-2222-2222-222222222222}"
RESTAURANT_ID=${RESTAURANT_ID-11111111-1111-1111-1111-111111111111}
: "${TTL_SECONDS:=28800}"
: "${BOARD_URL:=http://localhost:8080/}"

b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }

now=$(date +%s)
payload="{\"sub\":\"$SUB\",\"role\":\"authenticated\",\"iat\":$now,\"exp\":$((now + TTL_SECONDS))"
[ -z "$RESTAURANT_ID" ] || payload="$payload,\"restaurant_id\":\"$RESTAURANT_ID\""
[ -z "${JWT_AUDIENCE:-}" ] || payload="$payload,\"aud\":\"$JWT_AUDIENCE\""
[ -z "${JWT_ISSUER:-}" ] || payload="$payload,\"iss\":\"$JWT_ISSUER\""
payload="$payload}"

unsigned="$(printf '%s' '{"alg":"HS256","typ":"JWT"}' | b64url).$(printf '%s' "$payload" | b64url)"
signature=$(printf '%s' "$unsigned" | openssl dgst -sha256 -hmac "$JWT_SECRET" -binary | b64url)
token="$unsigned.$signature"

case "${1:-}" in
  --url) printf '%s?token=%s\n' "$BOARD_URL" "$token" ;;
  "") printf '%s\n' "$token" ;;
  *) echo "usage: dev-token.sh [--url]" >&2; exit 2 ;;
esac
