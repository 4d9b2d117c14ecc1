// node-redis (`redis` package): QUOTA.* on a standalone server and on Redis Cluster.
//
// node-redis's cluster client does not read COMMAND INFO: a command it does not know goes to
// any node unless it is told the key. Two ways to tell it, both shown here:
//   * a module definition whose parseCommand marks the user id with parser.pushKey();
//   * cluster.sendCommand(user, isReadonly, [...args]): the first argument is the routing key.
// Commands issued together (Promise.all) are pipelined per node by the client.
import { createClient, createCluster } from 'redis';
import {
  asObject, check, checkNoRedirects, isRedirect, movedCount, runExample, runId,
} from './common.mjs';

const T = 'acme';
const P = 'chat';

/** QUOTA.ADMIT / USAGE / GRANT as typed commands that declare the user id (3rd argument) as key. */
function userCommand(name, readonly) {
  return {
    IS_READ_ONLY: readonly,
    parseCommand(parser, tenant, project, user, ...rest) {
      parser.push(name, tenant, project);
      parser.pushKey(user);
      parser.push(...rest);
    },
    transformReply: undefined,
  };
}
const quota = {
  ADMIT: userCommand('QUOTA.ADMIT', false),
  USAGE: userCommand('QUOTA.USAGE', true),
  GRANT: userCommand('QUOTA.GRANT', false),
};

async function standalone(url) {
  const client = createClient({ url });
  await client.connect();
  const user = `nr-${runId}`;
  await client.sendCommand(['QUOTA.GRANT', T, P, user, '*', 'REQUESTS_PER_DAY', '2']);
  let allowed = 0;
  for (let i = 0; i < 5; i++) {
    const r = asObject(await client.sendCommand(['QUOTA.ADMIT', T, P, user, 'web', 'REQUESTS_PER_DAY', '1']));
    allowed += Number(r.allowed);
  }
  check(allowed === 3, `base 1 + credit 2 = 3 allowed, got ${allowed}`);
  const u = asObject(await client.sendCommand(['QUOTA.USAGE', T, P, user, 'web']));
  check(Number(u.requests_per_day) === 3, `requests_per_day 3, got ${u.requests_per_day}`);
  await client.close();
  console.log('node-redis standalone: 3 of 5 admitted (1 base + 2 credit)');
}

async function cluster(nodes) {
  const before = await movedCount(nodes);
  const c = createCluster({
    rootNodes: nodes.map(({ host, port }) => ({ url: `redis://${host}:${port}` })),
    modules: { quota },
  });
  await c.connect();
  const users = Array.from({ length: 200 }, (_, i) => `nrc-${runId}-${i}`);
  let seenRedirects = 0;

  // 1. One ADMIT per user through the typed module command: routed by the user's slot.
  for (const user of users) {
    try {
      const r = asObject(await c.quota.ADMIT(T, P, user, 'web', 'REQUESTS_PER_DAY', '5'));
      check(Number(r.allowed) === 1, `${user} admitted`);
    } catch (e) {
      if (isRedirect(e)) seenRedirects++;
      else throw e;
    }
  }
  // 2. The same through the raw sendCommand with the user as routing key, all at once
  //    (auto-pipelined per node).
  const replies = await Promise.allSettled(users.map((user) =>
    c.sendCommand(user, false, ['QUOTA.ADMIT', T, P, user, 'web', 'REQUESTS_PER_DAY', '5'])));
  for (const r of replies) {
    if (r.status === 'rejected') {
      if (isRedirect(r.reason)) seenRedirects++;
      else throw r.reason;
    }
  }
  // 3. A credit granted on one user's node applies to that user's admissions.
  const vip = `nrc-${runId}-vip`;
  await c.quota.GRANT(T, P, vip, '*', 'REQUESTS_PER_DAY', '1');
  const u = await Promise.all([1, 2, 3].map(() => c.quota.ADMIT(T, P, vip, 'web', 'REQUESTS_PER_DAY', '1')));
  check(u.filter((r) => Number(asObject(r).allowed) === 1).length === 2, 'vip: base 1 + credit 1');
  // 4. A multi-user read, pipelined: every user shows 2 requests today.
  const usage = await Promise.all(users.map((user) => c.quota.USAGE(T, P, user, 'web')));
  check(usage.every((r) => Number(asObject(r).requests_per_day) === 2), 'every user counted twice');
  // 5. QUOTA.CLEANUP has no key and does its whole job from any one master; running it on
  // every master is safe too (an advisory lock lets one do the work, the others reply 0).
  const cleaned = await Promise.all(c.masters.map(async (master) =>
    (await c.nodeClient(master)).sendCommand(['QUOTA.CLEANUP'])));
  check(cleaned.length === nodes.length && cleaned.every((n) => Number(n) >= 0), `CLEANUP ${cleaned}`);
  await c.close();
  await checkNoRedirects(nodes, before, seenRedirects);
  console.log(`node-redis cluster: 2 x ${users.length} ADMIT + pipelined USAGE, 0 MOVED`);
}

await runExample(standalone, cluster);
