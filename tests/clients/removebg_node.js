// Drives the npm `remove.bg` client (unchanged; see rebase.js) the way its README does, and
// prints what it got as one JSON line per call for tests/clients.rs to check.
const fs = require('fs');
const { removeBackgroundFromImageFile, removeBackgroundFromImageUrl, removeBackgroundFromImageBase64 } = require('remove.bg');

const apiKey = process.env.REMOVEBG_KEY;
const [photo, url, outDir] = process.argv.slice(2);

function report(name, promise) {
  return promise.then(
    (r) => console.log(JSON.stringify({ name, ok: true, result: r })),
    (errors) => console.log(JSON.stringify({ name, ok: false, errors })),
  );
}

(async () => {
  // Multipart upload, JSON response mode (the client always asks for JSON).
  await report('file', removeBackgroundFromImageFile({
    path: photo, apiKey, size: 'regular', type: 'auto', outputFile: `${outDir}/node-file.png`,
  }));
  // JSON body with an image URL, full size on a colour: format auto gives a JPEG.
  await report('url', removeBackgroundFromImageUrl({
    url, apiKey, size: 'full', bg_color: '#00ff00', outputFile: `${outDir}/node-url.jpg`,
  }));
  // JSON body with base64, the mask alone, cropped with a margin.
  await report('base64', removeBackgroundFromImageBase64({
    base64img: fs.readFileSync(photo).toString('base64'), apiKey, size: 'full', channels: 'alpha',
    crop: true, crop_margin: '10px',
  }));
  // A wrong key: the promise rejects with remove.bg's errors array.
  await report('bad_key', removeBackgroundFromImageFile({ path: photo, apiKey: 'wrong', size: 'preview' }));
})();
