// The npm package as a dashboard developer gets it: typed, packable,
// importable from Node and browsers, without the tests inside.
import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { mkdtempSync, readFileSync, rmSync, writeFileSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const run = promisify(execFile);
const pkgDir = fileURLToPath(new URL('../', import.meta.url));
const tsc = path.join(pkgDir, 'node_modules', '.bin', 'tsc');
const pkg = JSON.parse(readFileSync(path.join(pkgDir, 'package.json'), 'utf8'));

async function sh(cmd, args, opts = {}) {
  try {
    return await run(cmd, args, { cwd: pkgDir, maxBuffer: 16 << 20, timeout: 120000, ...opts });
  } catch (err) {
    throw new Error(`${cmd} ${args.join(' ')} failed (${err.code}):\n${err.stdout}\n${err.stderr}`);
  }
}

describe('orders-live package', () => {
  test('tsc --noEmit: declarations, the typed example and the React example type-check', async () => {
    const { stdout } = await sh(tsc, ['-p', 'tsconfig.json', '--noEmit']);
    assert.equal(stdout.trim(), '');
  });

  test('the declarations name every runtime export', async () => {
    const runtime = Object.keys(await import('../orders-live.js')).sort();
    const dts = readFileSync(path.join(pkgDir, 'orders-live.d.ts'), 'utf8');
    const declared = [...dts.matchAll(/^export declare (?:class|const|function) (\w+)/gm)].map((m) => m[1]);
    if (/^export default /m.test(dts)) declared.push('default');
    assert.deepEqual(declared.sort(), runtime);
  });

  test('npm pack: publishable metadata, exports for browsers and Node, no tests inside', async () => {
    assert.equal(pkg.name, 'orders-live');
    assert.match(pkg.version, /^\d+\.\d+\.\d+(-[\w.]+)?$/);
    assert.ok(pkg.license && pkg.license !== 'UNLICENSED', 'an open license');
    assert.notEqual(pkg.private, true, 'private packages cannot be published');
    const main = pkg.exports['.'];
    for (const cond of ['types', 'browser', 'node', 'default']) assert.ok(main[cond], `exports["."].${cond}`);
    assert.equal(Object.keys(main)[0], 'types', 'types first, as TypeScript requires');

    const dest = mkdtempSync(path.join(tmpdir(), 'orders-live-pack-'));
    try {
      const { stdout } = await sh('npm', ['pack', '--json', '--pack-destination', dest]);
      const [info] = JSON.parse(stdout);
      const files = info.files.map((f) => f.path).sort();
      assert.deepEqual(files, ['LICENSE', 'README.md', 'orders-live.d.ts', 'orders-live.js', 'package.json']);
      assert.ok(!files.some((f) => /(^|\/)(test|examples|node_modules)\//.test(f)));
      assert.ok(existsSync(path.join(dest, info.filename)));

      // Installed from the tarball into a fresh project: Node imports it by
      // name, and TypeScript (Node resolution) finds its types.
      const app = path.join(dest, 'app');
      await sh('mkdir', ['-p', app]);
      writeFileSync(path.join(app, 'package.json'), JSON.stringify({ name: 'app', private: true, type: 'module' }));
      await sh('npm', ['install', '--offline', '--no-audit', '--no-fund', '--loglevel=error', path.join(dest, info.filename)], { cwd: app });
      const { stdout: out } = await sh(process.execPath, ['--input-type=module', '-e',
        "import D, { OrdersLive, backoffDelay } from 'orders-live'; console.log(D === OrdersLive, typeof backoffDelay)"], { cwd: app });
      assert.equal(out.trim(), 'true function');
      writeFileSync(path.join(app, 'use.ts'), [
        "import { OrdersLive, type Order } from 'orders-live';",
        "const o: Order | undefined = new OrdersLive({ url: 'ws://x', getToken: () => 't', WebSocket: globalThis.WebSocket }).orders.get('a');",
        'export const n: string | null | undefined = o?.order_number;',
      ].join('\n'));
      await sh(tsc, ['--noEmit', '--strict', '--module', 'nodenext', '--moduleResolution', 'nodenext', '--lib', 'es2022,dom', '--types', '', 'use.ts'], { cwd: app });
    } finally {
      rmSync(dest, { recursive: true, force: true });
    }
  });
});
