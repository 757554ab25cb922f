// Mints HS256 JWTs (Supabase legacy style) with node:crypto.
import { createHmac } from 'node:crypto';

const b64url = (buf) => Buffer.from(buf).toString('base64url');

export function mintJwt(claims, secret) {
  const header = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const payload = b64url(JSON.stringify(claims));
  const sig = createHmac('sha256', secret).update(`${header}.${payload}`).digest('base64url');
  return `${header}.${payload}.${sig}`;
}

/** A token for `restaurantId` that expires in `ttlSeconds`. */
export function restaurantToken({ secret, restaurantId, sub = crypto.randomUUID(), ttlSeconds = 3600, extra = {} }) {
  const now = Math.floor(Date.now() / 1000);
  return mintJwt({ sub, restaurant_id: restaurantId, iat: now, exp: now + ttlSeconds, ...extra }, secret);
}
