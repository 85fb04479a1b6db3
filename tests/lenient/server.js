// A real Express app with Express's default routing: case-insensitive, and `/x/` equal to `/x`
// (`caseSensitive: false`, `strict: false`). tests/trust.rs puts tokengate in front of it.
// Prints `listening PORT` once ready. `GET /__hits` (asked directly, not through the gateway)
// lists the paths that reached a protected handler.
const express = require("express");

const hits = [];
const router = express.Router(); // defaults: caseSensitive false, strict false
router.get("/admin/panel", (req, res) => {
  hits.push(req.originalUrl);
  res.send("protected admin panel");
});
router.get("/settings", (req, res) => {
  hits.push(req.originalUrl);
  res.send("protected settings");
});
router.get("/*", (req, res) => res.send("public page"));

const app = express();
app.get("/__hits", (req, res) => res.json(hits));
app.use(["/x", "/y"], router);
const server = app.listen(0, "127.0.0.1", () => {
  console.log(`listening ${server.address().port}`);
});
