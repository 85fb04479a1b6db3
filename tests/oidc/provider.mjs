// A real OpenID provider for tests/oidc.rs and the browser test: the certified `oidc-provider`
// package on 127.0.0.1 (a free port), with one confidential client `tokengate` (secret
// `tokengate-test-secret`, PKCE required) registered as a native app so that its loopback
// redirect URI http://127.0.0.1/oidc/callback matches any port (RFC 8252 §7.3).
//
// People (sign in by typing the login name on the page; no password):
//   ada      ada@example.com        groups [developers]
//   root     root@example.com       groups [platform-admins]
//   mallory  mallory@evil.example   groups [developers]
//   unverified  nobody@example.com  email_verified false
//
// Prints `listening PORT` once ready.
import http from "node:http";
import Provider from "oidc-provider";

const people = {
  ada: { email: "ada@example.com", email_verified: true, name: "Ada Lovelace", groups: ["developers"] },
  root: { email: "root@example.com", email_verified: true, name: "Root Admin", groups: ["platform-admins"] },
  mallory: { email: "mallory@evil.example", email_verified: true, name: "Mallory", groups: ["developers"] },
  unverified: { email: "nobody@example.com", email_verified: false, name: "Nobody", groups: [] },
};

const server = http.createServer();
await new Promise((r) => server.listen(Number(process.env.PORT || 0), "127.0.0.1", r));
const port = server.address().port;
const issuer = `http://127.0.0.1:${port}`;

const provider = new Provider(issuer, {
  clients: [{
    client_id: "tokengate",
    client_secret: "tokengate-test-secret",
    application_type: "native",
    redirect_uris: ["http://127.0.0.1/oidc/callback"],
    grant_types: ["authorization_code"],
    response_types: ["code"],
    token_endpoint_auth_method: "client_secret_basic",
  }],
  pkce: { required: () => true },
  claims: {
    openid: ["sub"],
    email: ["email", "email_verified"],
    profile: ["name", "groups"],
  },
  conformIdTokenClaims: false,
  cookies: { keys: ["tokengate-test-cookie-key"] },
  findAccount: async (ctx, id) => {
    const p = people[id];
    if (!p) return undefined;
    return { accountId: id, claims: async () => ({ sub: id, ...p }) };
  },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  features: { devInteractions: { enabled: false } },
  ttl: { AccessToken: 600, AuthorizationCode: 60, IdToken: 600, Interaction: 600, Session: 600, Grant: 600 },
});

function page(uid) {
  return `<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,"><title>Test provider sign-in</title>
<h1>Test provider</h1>
<form method="post" action="/interaction/${uid}/login">
<label for="login">Login</label> <input id="login" name="login" autofocus>
<button type="submit" id="submit">Sign in</button>
</form>`;
}

async function body(req) {
  let s = "";
  for await (const chunk of req) s += chunk;
  return new URLSearchParams(s);
}

const handler = provider.callback();
server.on("request", async (req, res) => {
  const m = req.url.match(/^\/interaction\/([^/?]+)(\/login)?/);
  if (!m) return handler(req, res);
  try {
    const details = await provider.interactionDetails(req, res);
    if (req.method === "GET") {
      res.setHeader("content-type", "text/html; charset=utf-8");
      return res.end(page(details.uid));
    }
    const login = (await body(req)).get("login") || "";
    if (!people[login]) {
      res.statusCode = 400;
      res.setHeader("content-type", "text/html; charset=utf-8");
      return res.end("<p>Unknown login</p>" + page(details.uid));
    }
    const grant = new provider.Grant({ accountId: login, clientId: details.params.client_id });
    grant.addOIDCScope(details.params.scope);
    const grantId = await grant.save();
    await provider.interactionFinished(req, res, { login: { accountId: login }, consent: { grantId } }, { mergeWithLastSubmission: false });
  } catch (e) {
    res.statusCode = 400;
    res.end(String(e && e.message));
  }
});

console.log(`listening ${port}`);
