// Points the unchanged npm `remove.bg` client at the daemon: its endpoint is a private constant,
// and it calls `unirest.post(endpoint)` at request time, so this one wrapper (preloaded with
// `node -r ./rebase.js`) rewrites the base URL. REMOVEBG_BASE is e.g. http://127.0.0.1:8080.
const u = require(require.resolve('unirest', { paths: [require.resolve('remove.bg')] })); const p = u.post; u.post = (url, ...a) => p(url.replace('https://api.remove.bg', process.env.REMOVEBG_BASE), ...a);
