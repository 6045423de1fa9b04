// A real video player's VAST library, for tests/integration/test_vast_client.py.
//
//   node tests/vast_client.mjs NODE_MODULES_PARENT URL [COOKIE]
//
// NODE_MODULES_PARENT is the directory where `npm install @dailymotion/vast-client@6` ran (the
// test keeps it out of the repository, so this script resolves the package from there rather
// than from its own location). The client fetches URL with Node's global fetch, as it does in a
// browser, and parses the answer. One JSON line on stdout, exit code 0 either way:
//   {"ok": true, "version": "4.2", "ads": 1, "creatives": [["linear"]],
//    "impressions": [["http://.../xsp/impression?t=..."]], "warnings": [], "noAd": false,
//    "patchedDoms": 3}
//   {"ok": false, "error": "Error: URLHandler: No Content (204)", "warnings": [], "patchedDoms": 3}
// (creatives and impressions: one list per ad; warnings: the client's own complaints about the
// document; noAd: it reported "no ad", VAST error 303; patchedDoms: see below.)
import { existsSync, readdirSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";

const [modulesParent, url, cookie] = process.argv.slice(2);
const require = createRequire(join(modulesParent, "package.json"));
const { VASTClient } = require("@dailymotion/vast-client");

// The client checks a document's required elements and attributes (AdServingId, UniversalAdId,
// MediaFile's delivery...) through `element.children`, which browsers have and the DOM it uses
// under Node (a copy of @xmldom/xmldom 0.8 bundled in its dist/chunks) lacks: without this, those
// checks never run here. Every copy of that DOM the package can load gets the getter.
function domParsers() {
  const parsers = [];
  const chunks = join(dirname(require.resolve("@dailymotion/vast-client")), "chunks");
  const files = existsSync(chunks) ? readdirSync(chunks) : [];
  for (const file of files.filter((f) => f.startsWith("xmldom") && f.endsWith(".js"))) {
    const parser = require(join(chunks, file)).index?.DOMParser;
    if (parser) parsers.push(parser);
  }
  try {
    parsers.push(require("@xmldom/xmldom").DOMParser);
  } catch {
    // not installed on its own: only the bundled copies are used
  }
  return parsers;
}
let patchedDoms = 0;
for (const DOMParser of domParsers()) {
  const element = new DOMParser().parseFromString("<a/>", "text/xml").documentElement;
  const prototype = Object.getPrototypeOf(element);
  if (!("children" in prototype)) {
    Object.defineProperty(prototype, "children", {
      get() {
        return Array.from(this.childNodes).filter((node) => node.nodeType === 1);
      },
    });
  }
  patchedDoms += 1;
}

const client = new VASTClient();
const warnings = [];
let noAd = false;
// The parser's own report of a document that is not quite VAST (a missing required element or
// attribute), and of "no ad" (error code 303), which it signals without rejecting.
client.getParser().on("VAST-warning", (event) => warnings.push(event.message));
client.getParser().on("VAST-error", (event) => {
  if (String(event.ERRORCODE) === "303") noAd = true;
});

const options = { timeout: 10000 };
if (cookie) options.fetchOptions = { headers: { Cookie: cookie } };

try {
  const response = await client.get(url, options);
  console.log(
    JSON.stringify({
      ok: true,
      version: response.version,
      ads: response.ads.length,
      creatives: response.ads.map((ad) => ad.creatives.map((creative) => creative.type)),
      impressions: response.ads.map((ad) => ad.impressionURLTemplates.map((i) => i.url)),
      warnings,
      noAd,
      patchedDoms,
    }),
  );
} catch (error) {
  console.log(JSON.stringify({ ok: false, error: String(error?.message ?? error), warnings, patchedDoms }));
}
