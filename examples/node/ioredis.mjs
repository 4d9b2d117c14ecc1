// ioredis: QUOTA.* on a standalone server and on Redis Cluster.
//
// ioredis's Cluster finds a command's slot from its own table of Redis commands; for a module
// command it finds no key and sends it to any node, which answers MOVED. The example gives
// each QUOTA.* command its slot explicitly: a Command whose getSlot() is the user id's slot
// (cluster-key-slot, the same CRC16 and hash-tag rule as Redis). A pipeline must stay on one
// node, so a pipeline across users is split by the node that owns each user's slot.
import Redis, { Cluster, Command } from 'ioredis';
import calculateSlot from 'cluster-key-slot';
import {
  asObject, check, checkNoRedirects, isRedirect, movedCount, runExample, runId,
} from './common.mjs';

const T = 'acme';
const P = 'chat';

/** A QUOTA.* command on `user` (its 3rd argument), routed to the node holding the user. */
class UserCommand extends Command {
  constructor(name, [tenant, project, user, ...rest]) {
    super(name, [tenant, project, user, ...rest], { replyEncoding: 'utf8' });
    this.user = user;
  }

  getSlot() {
    return calculateSlot(this.user);
  }

  getKeys() {
    return [this.user];
  }
}

function call(client, name, args) {
  const cmd = new UserCommand(name, args);
  client.sendCommand(cmd);
  return cmd.promise;
}

/** Runs `[name, args]` for many users: one pipeline per master, replies in input order. */
async function pipelineAcrossUsers(cluster, calls) {
  const groups = new Map();
  calls.forEach(([name, args], i) => {
    const owner = cluster.slots[calculateSlot(args[2])]?.[0] ?? 'unknown';
    if (!groups.has(owner)) groups.set(owner, []);
    groups.get(owner).push([i, name, args]);
  });
  const out = new Array(calls.length);
  await Promise.all([...groups.values()].map(async (group) => {
    const pipeline = cluster.pipeline();
    for (const [, name, args] of group) pipeline.sendCommand(new UserCommand(name, args));
    const results = await pipeline.exec();
    results.forEach(([err, reply], j) => { out[group[j][0]] = [err, reply]; });
  }));
  return out;
}

async function standalone(url) {
  const client = new Redis(url);
  const user = `io-${runId}`;
  await client.call('QUOTA.GRANT', T, P, user, '*', 'REQUESTS_PER_DAY', '2');
  let allowed = 0;
  for (let i = 0; i < 5; i++) {
    const r = asObject(await client.call('QUOTA.ADMIT', T, P, user, 'web', 'REQUESTS_PER_DAY', '1'));
    allowed += Number(r.allowed);
  }
  check(allowed === 3, `base 1 + credit 2 = 3 allowed, got ${allowed}`);
  const u = asObject(await client.call('QUOTA.USAGE', T, P, user, 'web'));
  check(Number(u.requests_per_day) === 3, `requests_per_day 3, got ${u.requests_per_day}`);
  client.disconnect();
  console.log('ioredis standalone: 3 of 5 admitted (1 base + 2 credit)');
}

async function cluster(nodes) {
  const before = await movedCount(nodes);
  const c = new Cluster(nodes, { scaleReads: 'master' });
  await new Promise((resolve, reject) => { c.once('ready', resolve); c.once('error', reject); });
  const users = Array.from({ length: 200 }, (_, i) => `ioc-${runId}-${i}`);
  let seenRedirects = 0;

  // 1. One ADMIT per user, each sent straight to the user's node.
  for (const user of users) {
    try {
      const r = asObject(await call(c, 'QUOTA.ADMIT', [T, P, user, 'web', 'REQUESTS_PER_DAY', '5']));
      check(Number(r.allowed) === 1, `${user} admitted`);
    } catch (e) {
      if (isRedirect(e)) seenRedirects++;
      else throw e;
    }
  }
  // 2. A pipeline across all users: ADMIT then USAGE for each, split by node.
  const calls = users.flatMap((user) => [
    ['QUOTA.ADMIT', [T, P, user, 'web', 'REQUESTS_PER_DAY', '5']],
    ['QUOTA.USAGE', [T, P, user, 'web']],
  ]);
  const results = await pipelineAcrossUsers(c, calls);
  for (const [i, [err, reply]] of results.entries()) {
    if (err) {
      if (isRedirect(err)) { seenRedirects++; continue; }
      throw err;
    }
    if (i % 2 === 1) check(Number(asObject(reply).requests_per_day) === 2, `${calls[i][1][2]} counted twice`);
  }
  // 3. A credit granted on one user's node applies to that user's admissions.
  const vip = `ioc-${runId}-vip`;
  await call(c, 'QUOTA.GRANT', [T, P, vip, '*', 'REQUESTS_PER_DAY', '1']);
  let allowed = 0;
  for (let i = 0; i < 3; i++) {
    allowed += Number(asObject(await call(c, 'QUOTA.ADMIT', [T, P, vip, 'web', 'REQUESTS_PER_DAY', '1'])).allowed);
  }
  check(allowed === 2, `vip: base 1 + credit 1, got ${allowed}`);
  // 4. QUOTA.CLEANUP has no key and does its whole job from any one master; running it on
  // every master is safe too (an advisory lock lets one do the work, the others reply 0).
  const cleaned = await Promise.all(c.nodes('master').map((node) => node.call('QUOTA.CLEANUP')));
  check(cleaned.length === nodes.length && cleaned.every((n) => Number(n) >= 0), `CLEANUP ${cleaned}`);
  c.disconnect();
  await checkNoRedirects(nodes, before, seenRedirects);
  console.log(`ioredis cluster: ${users.length} ADMIT + a ${calls.length}-command pipeline across users, 0 MOVED`);
}

await runExample(standalone, cluster);
