// Headless Debian chromium driven by playwright-core (no browser download).
import { existsSync, mkdtempSync, rmSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { IN_CI } from './gateway.mjs';

export const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
export const ARTIFACTS = fileURLToPath(new URL('../../test-artifacts/', import.meta.url));

/** Skip reason, false when chromium is there; throws under CI=true. */
export function chromiumUnavailable() {
  if (existsSync(CHROMIUM)) return false;
  const why = `chromium not found at ${CHROMIUM} (apt-get install chromium)`;
  if (IN_CI) throw new Error(`${why}; CI=true so this is a failure, not a skip`);
  return why;
}

/** Launches chromium with a fresh profile; returns { context, page, errors, close }. */
export async function openBrowser({ extraArgs = [] } = {}) {
  const userDataDir = mkdtempSync(path.join(tmpdir(), 'orders-board-chromium-'));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--no-sandbox', '--headless', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      ...extraArgs,
    ],
    viewport: { width: 1400, height: 900 },
  });
  const page = context.pages()[0] ?? await context.newPage();
  const errors = [];
  page.on('pageerror', (err) => errors.push(`pageerror: ${err.message}`));
  page.on('console', (msg) => {
    // Failed WebSocket attempts while the server is down are expected noise.
    if (msg.type() === 'error' && !/WebSocket/i.test(msg.text())) errors.push(`console: ${msg.text()}`);
  });
  return {
    context,
    page,
    errors,
    async screenshot(name) {
      mkdirSync(ARTIFACTS, { recursive: true });
      const file = path.join(ARTIFACTS, name);
      await page.screenshot({ path: file, fullPage: true });
      return file;
    },
    async close() {
      await context.close().catch(() => {});
      rmSync(userDataDir, { recursive: true, force: true });
    },
  };
}

/** Board helpers on a page. */
export function board(page) {
  return {
    state: () => page.locator('#connection-state').textContent(),
    waitState: (text, timeout = 15000) => page.waitForFunction(
      (t) => document.querySelector('#connection-state')?.textContent === t, text, { timeout }),
    card: (id) => page.locator(`[data-order-id="${id}"]`),
    cardIn: (status, id) => page.locator(`[data-column="${status}"] [data-order-id="${id}"]`),
    count: async (status) => Number(await page.locator(`[data-count="${status}"]`).textContent()),
    allCardIds: () => page.$$eval('[data-order-id]', (els) => els.map((e) => e.dataset.orderId)),
  };
}
