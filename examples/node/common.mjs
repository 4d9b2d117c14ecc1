// Helpers shared by the Node examples: reply shapes, checks, and the MOVED count a cluster's
// masters report (INFO errorstats), so an example can prove its client never needed a redirect.
import { createClient } from 'redis';

/** A QUOTA.* reply that describes something, as a plain object (RESP2 flat array or RESP3 map). */
export function asObject(reply) {
  if (reply instanceof Map) return Object.fromEntries(reply);
  if (Array.isArray(reply)) {
    const out = {};
    for (let i = 0; i + 1 < reply.length; i += 2) out[String(reply[i])] = reply[i + 1];
    return out;
  }
  if (reply && typeof reply === 'object') return reply;
  throw new Error(`not a map reply: ${JSON.stringify(reply)}`);
}

export function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}

/** A fresh id suffix so runs on the same server never share users. */
export const runId = `${Date.now().toString(36)}-${process.pid}-${Math.floor(Math.random() * 1e6)}`;

/** `host:port` of every node in QUOTA_CLUSTER_NODES (comma separated), or [] when unset. */
export function clusterNodes() {
  const raw = process.env.QUOTA_CLUSTER_NODES ?? '';
  return raw.split(',').map((s) => s.trim()).filter(Boolean).map((hp) => {
    const [host, port] = hp.split(':');
    return { host, port: Number(port) };
  });
}

/** Sum of MOVED replies the given nodes have sent so far (INFO errorstats). */
export async function movedCount(nodes) {
  let total = 0;
  for (const { host, port } of nodes) {
    const c = createClient({ socket: { host, port } });
    await c.connect();
    const info = await c.info('errorstats');
    await c.close();
    const m = /errorstat_MOVED:count=(\d+)/.exec(info);
    total += m ? Number(m[1]) : 0;
  }
  return total;
}

/** Whether an error (or an error reply inside a pipeline result) is a cluster redirect. */
export function isRedirect(e) {
  return /^(MOVED|ASK) /.test(String(e?.message ?? e ?? ''));
}

/** Fails unless neither the application nor the servers saw a redirect since `before`. */
export async function checkNoRedirects(nodes, before, seenByApp) {
  const sent = (await movedCount(nodes)) - before;
  check(seenByApp === 0, `the application saw ${seenByApp} MOVED`);
  check(sent === 0, `the servers sent ${sent} MOVED`);
}

/** Runs `standalone(REDIS_URL)`, then `cluster(nodes)` when QUOTA_CLUSTER_NODES is set. */
export async function runExample(standalone, cluster) {
  await standalone(process.env.REDIS_URL ?? 'redis://127.0.0.1:6379');
  const nodes = clusterNodes();
  if (nodes.length > 0) await cluster(nodes);
  else console.log('QUOTA_CLUSTER_NODES not set: cluster part skipped');
  console.log('ok');
}
