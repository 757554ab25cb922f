// A tiny in-process WebSocket server that plays the gateway's side of the
// protocol under the test's control.
//
// With { serveBoard: true } it also serves the live board's static files the
// way the gateway does (/, /board.js, /board.css, /client/orders-live.js), so
// the board can be tested in a browser without the gateway binary.
import { once } from 'node:events';
import { createServer } from 'node:http';
import { readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import { WebSocketServer } from 'ws';
import { AsyncQueue } from './util.mjs';

const repo = (rel) => fileURLToPath(new URL(`../../../../${rel}`, import.meta.url));
const STATIC = {
  '/': ['web/board/index.html', 'text/html; charset=utf-8'],
  '/board.js': ['web/board/board.js', 'text/javascript; charset=utf-8'],
  '/board.css': ['web/board/board.css', 'text/css; charset=utf-8'],
  '/client/orders-live.js': ['clients/js/orders-live.js', 'text/javascript; charset=utf-8'],
};

export async function startFakeServer({ serveBoard = false } = {}) {
  const http = createServer(async (req, res) => {
    const entry = serveBoard && STATIC[new URL(req.url, 'http://x').pathname];
    if (!entry) {
      res.writeHead(404).end();
      return;
    }
    const body = await readFile(repo(entry[0]));
    res.writeHead(200, { 'content-type': entry[1], 'cache-control': 'no-store' }).end(body);
  });
  const wss = new WebSocketServer({ server: http, path: '/api/ws/orders/live' });
  http.listen(0, '127.0.0.1');
  await once(http, 'listening');
  const { port } = http.address();
  const queue = new AsyncQueue();
  const connections = [];

  wss.on('connection', (ws, req) => {
    const url = new URL(req.url, `http://127.0.0.1:${port}`);
    const messages = new AsyncQueue();
    const conn = {
      ws,
      path: url.pathname,
      query: Object.fromEntries(url.searchParams),
      received: [],
      closed: new Promise((resolve) => ws.on('close', (code, reason) => resolve({ code, reason: reason.toString() }))),
      send(obj) { ws.send(JSON.stringify(obj)); },
      establish(extra = {}) {
        this.send({
          type: 'connection_established',
          restaurant_id: '00000000-0000-4000-8000-000000000001',
          message: 'Connected to real-time order updates',
          connection_id: `c${connections.length}`,
          instance_id: 'fake',
          heartbeat_interval_ms: 25000,
          resumed: false,
          ...extra,
        });
      },
      close(code, reason = '') { ws.close(code, reason); },
      terminate() { ws.terminate(); },
      nextMessage(timeout) { return messages.shift(timeout, 'a client message'); },
    };
    ws.on('message', (data) => {
      const msg = JSON.parse(data.toString());
      conn.received.push(msg);
      messages.push(msg);
    });
    connections.push(conn);
    queue.push(conn);
  });

  return {
    port,
    url: `ws://127.0.0.1:${port}/api/ws/orders/live`,
    httpUrl: `http://127.0.0.1:${port}`,
    connections,
    nextConnection(timeout = 5000) { return queue.shift(timeout, 'a client connection'); },
    async close() {
      for (const c of wss.clients) c.terminate();
      await new Promise((resolve) => wss.close(resolve));
      http.closeAllConnections?.();
      await new Promise((resolve) => http.close(resolve));
    },
  };
}
