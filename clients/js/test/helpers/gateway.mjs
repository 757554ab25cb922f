// Runs the real orders-gateway binary for integration tests: embedded broker
// (no REDIS_URL), no database, HS256 tokens minted here.
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createServer } from 'node:net';
import { randomBytes } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import { restaurantToken } from './jwt.mjs';
import { sleep } from './util.mjs';

const clientsJsDir = fileURLToPath(new URL('../../', import.meta.url));
export const GATEWAY_BIN = path.resolve(clientsJsDir, process.env.GATEWAY_BIN || '../../target/debug/orders-gateway');
export const IN_CI = process.env.CI === 'true';

/**
 * Why tests needing the binary cannot run: a string (skip reason) or false.
 * Under CI=true a missing binary is an error, never a skip.
 */
export function gatewayUnavailable() {
  if (existsSync(GATEWAY_BIN)) return false;
  const why = `gateway binary not found at ${GATEWAY_BIN} (build it or set GATEWAY_BIN)`;
  if (IN_CI) throw new Error(`${why}; CI=true so this is a failure, not a skip`);
  return why;
}

/** A TCP port that was free a moment ago on 127.0.0.1. */
export async function freePort() {
  const srv = createServer();
  await new Promise((resolve, reject) => srv.listen(0, '127.0.0.1', resolve).on('error', reject));
  const { port } = srv.address();
  await new Promise((resolve) => srv.close(resolve));
  return port;
}

export class Gateway {
  constructor({ port, env = {} } = {}) {
    this.port = port;
    this.secret = randomBytes(24).toString('hex');
    this.apiKey = randomBytes(16).toString('hex');
    this.extraEnv = env;
    this.proc = null;
    this.logs = '';
  }

  get httpUrl() { return `http://127.0.0.1:${this.port}`; }
  get wsUrl() { return `ws://127.0.0.1:${this.port}/api/ws/orders/live`; }

  /** Starts the binary (again, on the same port and secrets) and waits for /healthz. */
  async start() {
    if (!this.port) this.port = await freePort();
    for (let attempt = 0; ; attempt++) {
      try {
        await this._startOnce();
        return this;
      } catch (err) {
        // The port can be briefly unavailable right after a previous process died.
        if (attempt >= 5 || !/address|in use|bind/i.test(this.logs)) throw err;
        await sleep(300);
      }
    }
  }

  async _startOnce() {
    const env = { ...process.env };
    for (const k of ['REDIS_URL', 'DATABASE_URL', 'JWT_JWKS_URL', 'JWT_AUDIENCE', 'JWT_ISSUER', 'ALLOWED_ORIGINS', 'DEMO']) delete env[k];
    Object.assign(env, {
      BIND_ADDR: `127.0.0.1:${this.port}`,
      JWT_SECRET: this.secret,
      PUBLISH_API_KEY: this.apiKey,
      SHUTDOWN_DRAIN_MS: '1000',
      RUST_LOG: process.env.RUST_LOG || 'info',
    }, this.extraEnv);
    this.logs = '';
    const proc = spawn(GATEWAY_BIN, [], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    this.proc = proc;
    const append = (d) => { this.logs = (this.logs + d.toString()).slice(-20000); };
    proc.stdout.on('data', append);
    proc.stderr.on('data', append);
    this.exited = new Promise((resolve) => proc.on('exit', (code, signal) => resolve({ code, signal })));
    let exit = null;
    this.exited.then((e) => { exit = e; });
    const deadline = Date.now() + 30000;
    for (;;) {
      if (exit) throw new Error(`gateway exited at start (${JSON.stringify(exit)}):\n${this.logs}`);
      try {
        const res = await fetch(`${this.httpUrl}/healthz`, { signal: AbortSignal.timeout(1000) });
        if (res.ok) return;
      } catch { /* not listening yet */ }
      if (Date.now() > deadline) {
        proc.kill('SIGKILL');
        throw new Error(`gateway did not answer /healthz within 30 s:\n${this.logs}`);
      }
      await sleep(50);
    }
  }

  /** Stops the process: SIGTERM (graceful drain, 1001) or SIGKILL (abrupt, 1006). */
  async stop(signal = 'SIGTERM') {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
    proc.kill(signal);
    const timer = setTimeout(() => proc.kill('SIGKILL'), 15000);
    await this.exited;
    clearTimeout(timer);
    this.proc = null;
  }

  token(restaurantId, opts = {}) {
    return restaurantToken({ secret: this.secret, restaurantId, ...opts });
  }

  /** POST /api/orders/events → { status, body }. */
  async publish(type, order, extra = {}) {
    const res = await fetch(`${this.httpUrl}/api/orders/events`, {
      method: 'POST',
      headers: { authorization: `Bearer ${this.apiKey}`, 'content-type': 'application/json' },
      body: JSON.stringify({ type, order, ...extra }),
    });
    const text = await res.text();
    let body;
    try { body = JSON.parse(text); } catch { body = text; }
    return { status: res.status, body };
  }

  /** publish() that must be accepted (202) and returns the event_id. */
  async publishOk(type, order, extra = {}) {
    const { status, body } = await this.publish(type, order, extra);
    if (status !== 202 || typeof body?.event_id !== 'string') {
      throw new Error(`POST /api/orders/events ${type}: expected 202 {event_id}, got ${status} ${JSON.stringify(body)}`);
    }
    return body.event_id;
  }
}
