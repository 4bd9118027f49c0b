// Builds the browser client into server/static/, which the Python package serves at GET /.
// `make web` runs `npm ci && npm run build` here; the output is committed so that the
// installed server needs no Node at run time.
import { copyFile, mkdir, readFile, stat } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "..", "..", "server", "static");

await mkdir(out, { recursive: true });
await build({
  entryPoints: [join(here, "src", "app.js")],
  outfile: join(out, "app.js"),
  bundle: true,
  format: "esm",
  target: ["es2020"],
  minify: true,
  legalComments: "eof",
  logLevel: "warning",
});
for (const name of ["index.html", "app.css"]) {
  await copyFile(join(here, "src", name), join(out, name));
}
for (const name of ["index.html", "app.css", "app.js"]) {
  const { size } = await stat(join(out, name));
  console.log(`server/static/${name}  ${(size / 1024).toFixed(1)} KiB`);
}
// The page must load the bundle by the name the server whitelists.
const html = await readFile(join(out, "index.html"), "utf8");
if (!html.includes('src="app.js"') || !html.includes('href="app.css"')) {
  throw new Error("index.html must load app.js and app.css");
}
