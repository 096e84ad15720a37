//! A PNG writer for big cutouts that keeps every inference thread busy.
//!
//! The rows are cut into bands of about `BAND_BYTES`. Each band is produced by the caller's row
//! function (so the full-size RGBA frame never exists), Paeth-filtered, and compressed on its
//! own into its own IDAT chunk. A band is one deflate block with a Huffman code fitted to that
//! band, plus runs of zeros (what flat areas filter to); a sync flush ends it, so the bands
//! concatenate into one zlib stream. There is no LZ77 string search: it costs most of a general
//! compressor's time and finds little in photographs (the approach of fpnge and fdeflate).

use std::ops::Range;

use rayon::prelude::*;

/// Uncompressed bytes per band: a band's rows, their filtered copy and its output fit in a
/// core's L2, and the per-band header (about 100 bytes) stays negligible.
const BAND_BYTES: usize = 512 << 10;
/// One row in this many is counted to fit a band's Huffman code. Neighbouring rows of a photo
/// have near-identical statistics, and counting every row took half the compressor's time.
const SAMPLE_EVERY: usize = 4;
/// Deflate's longest literal/length code, and its longest code-length code.
const MAX_BITS: u8 = 15;
const MAX_CL_BITS: u8 = 7;
/// End of block, and the first length symbol.
const EOB: usize = 256;
const LEN_SYMBOL_BASE: usize = 257;
/// Literal/length symbols in use (deflate's 286, the last two never occur).
const LITLEN: usize = 286;
/// The order the code-length code's lengths are stored in (RFC 1951 3.2.7).
const CL_ORDER: [usize; 19] = [16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15];
/// Base match length and extra bits of each length symbol 257..=285.
const LEN_BASE: [u16; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258,
];
const LEN_EXTRA: [u8; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
const ADLER_MOD: u32 = 65521;

/// PNG colour type for 8-bit samples with this many channels.
fn color_type(channels: usize) -> u8 {
    match channels {
        1 => 0, // gray
        2 => 4, // gray + alpha
        3 => 2, // RGB
        4 => 6, // RGBA
        _ => panic!("PNG has no 8-bit layout with {channels} channels"),
    }
}

/// Encodes a `width`x`height` 8-bit PNG of `channels` channels (1 gray, 2 gray+alpha, 3 RGB,
/// 4 RGBA) whose row `y` is written by `fill(y, row)`. Bands run on the current rayon pool;
/// `fill` may be called for a row more than once (a band also needs the row above it).
pub fn write_png(width: u32, height: u32, channels: usize, fill: impl Fn(usize, &mut [u8]) + Sync) -> Vec<u8> {
    assert!(width > 0 && height > 0, "a PNG has at least one pixel");
    let stride = width as usize * channels;
    let rows_per_band = (BAND_BYTES / (stride + 1)).max(1);
    let bands: Vec<Range<usize>> = (0..height as usize)
        .step_by(rows_per_band)
        .map(|y| y..(y + rows_per_band).min(height as usize))
        .collect();
    let encoded: Vec<Band> = bands
        .into_par_iter()
        .map(|rows| encode_band(rows, stride, channels, &fill))
        .collect();

    let total: usize = encoded.iter().map(|b| b.deflated.len() + 12).sum();
    let mut png = Vec::with_capacity(total + 64);
    png.extend_from_slice(b"\x89PNG\r\n\x1a\n");
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, color_type(channels), 0, 0, 0]);
    chunk(&mut png, b"IHDR", &[&ihdr]);
    let mut adler = 1;
    let last = encoded.len() - 1;
    for (i, band) in encoded.iter().enumerate() {
        adler = adler32_combine(adler, band.adler, band.raw_len);
        // zlib header (deflate, 32 KB window, fastest) before the first band; after the last,
        // an empty final block (fixed Huffman: BFINAL=1, BTYPE=01, end-of-block) and the Adler-32.
        let head: &[u8] = if i == 0 { &[0x78, 0x01] } else { &[] };
        let mut tail = Vec::new();
        if i == last {
            tail.extend_from_slice(&[0x03, 0x00]);
            tail.extend_from_slice(&adler.to_be_bytes());
        }
        chunk(&mut png, b"IDAT", &[head, &band.deflated, &tail]);
    }
    chunk(&mut png, b"IEND", &[]);
    png
}

/// Appends one PNG chunk whose data is the concatenation of `parts`.
fn chunk(png: &mut Vec<u8>, kind: &[u8; 4], parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    png.extend_from_slice(&u32::try_from(len).expect("chunk under 4 GB").to_be_bytes());
    let start = png.len();
    png.extend_from_slice(kind);
    for p in parts {
        png.extend_from_slice(p);
    }
    let crc = crc32fast::hash(&png[start..]);
    png.extend_from_slice(&crc.to_be_bytes());
}

/// One band's share of the zlib stream: whole deflate blocks ending on a byte boundary.
struct Band {
    deflated: Vec<u8>,
    /// Adler-32 and length of the band's uncompressed (filtered) bytes.
    adler: u32,
    raw_len: usize,
}

fn encode_band(rows: Range<usize>, stride: usize, bpp: usize, fill: &(impl Fn(usize, &mut [u8]) + Sync)) -> Band {
    // raw holds the row above the band (zeros above the first row, as PNG defines) and the band.
    let mut raw = vec![0u8; (rows.len() + 1) * stride];
    if rows.start > 0 {
        fill(rows.start - 1, &mut raw[..stride]);
    }
    for (i, y) in rows.clone().enumerate() {
        fill(y, &mut raw[(i + 1) * stride..][..stride]);
    }
    let mut filtered = vec![0u8; rows.len() * (stride + 1)];
    for (i, out) in filtered.chunks_exact_mut(stride + 1).enumerate() {
        out[0] = 4; // Paeth
        paeth(
            &raw[i * stride..][..stride],
            &raw[(i + 1) * stride..][..stride],
            bpp,
            &mut out[1..],
        );
    }
    drop(raw);
    let mut adler = simd_adler32::Adler32::new();
    adler.write(&filtered);
    Band {
        deflated: deflate_block(&filtered, stride + 1),
        adler: adler.finish(),
        raw_len: filtered.len(),
    }
}

/// PNG's Paeth filter of `cur` (row above: `up`; `bpp` bytes per pixel). Every predictor input
/// is a raw byte, so unlike decoding there is no chain from one byte to the next and the loop
/// vectorises: 32 bytes at a time where the CPU has AVX2.
fn paeth(up: &[u8], cur: &[u8], bpp: usize, out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { paeth_avx2(up, cur, bpp, out) };
    }
    paeth_rows(up, cur, bpp, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn paeth_avx2(up: &[u8], cur: &[u8], bpp: usize, out: &mut [u8]) {
    paeth_rows(up, cur, bpp, out)
}

#[inline(always)]
fn paeth_rows(up: &[u8], cur: &[u8], bpp: usize, out: &mut [u8]) {
    let n = cur.len().min(bpp);
    // Left of the first pixel is zero: the predictor is always the byte above.
    for i in 0..n {
        out[i] = cur[i].wrapping_sub(up[i]);
    }
    let lanes = out[bpp..].iter_mut().zip(&cur[bpp..]).zip(cur).zip(&up[bpp..]).zip(up);
    for ((((o, &x), &a), &b), &c) in lanes {
        let (a16, b16, c16) = (a as i16, b as i16, c as i16);
        let pa = (b16 - c16).abs();
        let pb = (a16 - c16).abs();
        let pc = (a16 + b16 - 2 * c16).abs();
        let predicted = if pa <= pb && pa <= pc {
            a
        } else if pb <= pc {
            b
        } else {
            c
        };
        *o = x.wrapping_sub(predicted);
    }
}

/// Zero runs shorter than this stay literals.
const MIN_RUN: usize = 32;

/// What the tokenizer produces: literal bytes and matches of distance 1 (repeats of the byte
/// before), 3..=258 long.
trait Tokens {
    fn literal(&mut self, byte: u8);
    /// Eight literals at once (the common case, which the writer packs into two bit writes).
    fn literals8(&mut self, bytes: &[u8; 8]) {
        bytes.iter().for_each(|&b| self.literal(b));
    }
    fn repeat(&mut self, len: usize);
}

/// Splits `data` into literals and zero runs. Runs are found eight bytes at a time: a run is
/// all-zero 8-byte words, with the zero bytes just after them, `MIN_RUN` or more in all.
/// Other zeros stay literals, which the Huffman code makes cheap anyway.
#[inline(always)]
fn tokenize(data: &[u8], sink: &mut impl Tokens) {
    let mut run = 0;
    let mut chunks = data.chunks_exact(8);
    for chunk in &mut chunks {
        let chunk: &[u8; 8] = chunk.try_into().expect("8 bytes");
        let word = u64::from_le_bytes(*chunk);
        if word == 0 {
            run += 8;
        } else if run == 0 {
            sink.literals8(chunk);
        } else {
            let lead = (word.trailing_zeros() / 8) as usize;
            zeros(run + lead, sink);
            run = 0;
            for &b in &chunk[lead..] {
                sink.literal(b);
            }
        }
    }
    for &b in chunks.remainder() {
        if b == 0 {
            run += 1;
        } else {
            zeros(run, sink);
            run = 0;
            sink.literal(b);
        }
    }
    zeros(run, sink);
}

/// Emits a run of zeros: as literals when short (each zero then costs a bit or two, less
/// than a match code), else as a zero and matches.
#[inline(always)]
fn zeros(run: usize, sink: &mut impl Tokens) {
    if run < MIN_RUN {
        for _ in 0..run / 8 {
            sink.literals8(&[0; 8]);
        }
        for _ in 0..run % 8 {
            sink.literal(0);
        }
        return;
    }
    sink.literal(0);
    let mut rest = run - 1;
    while rest >= 3 {
        // Never leave a tail of 1 or 2, which no match can cover.
        let len = match rest {
            0..=258 => rest,
            259..=260 => rest - 3,
            _ => 258,
        };
        sink.repeat(len);
        rest -= len;
    }
    for _ in 0..rest {
        sink.literal(0);
    }
}

/// The length symbol (index into LEN_BASE) of a match length.
fn length_index(len: usize) -> usize {
    debug_assert!((3..=258).contains(&len));
    if len == 258 {
        return 28;
    }
    LEN_BASE.partition_point(|&base| base as usize <= len) - 1
}

/// Symbol counts of a band, and the extra bits its matches need.
struct Counts {
    freq: [u64; LITLEN],
    extra_bits: u64,
}

impl Tokens for Counts {
    #[inline]
    fn literal(&mut self, byte: u8) {
        self.freq[byte as usize] += 1;
    }
    #[inline]
    fn repeat(&mut self, len: usize) {
        let i = length_index(len);
        self.freq[LEN_SYMBOL_BASE + i] += 1;
        self.extra_bits += LEN_EXTRA[i] as u64 + 1; // + the one-bit distance code
    }
}

/// Deflate's bit order: values go in least significant bit first. The output lives outside
/// the writer, so that the pending bits can stay in registers while bytes are appended.
struct BitWriter<'a> {
    out: &'a mut Vec<u8>,
    buf: u64,
    bits: u32,
}

impl<'a> BitWriter<'a> {
    fn new(out: &'a mut Vec<u8>) -> BitWriter<'a> {
        BitWriter { out, buf: 0, bits: 0 }
    }

    /// Appends the low `n` (≤ 60) bits of `value`.
    #[inline(always)]
    fn put(&mut self, value: u64, n: u32) {
        debug_assert!(n <= 60 && value.checked_shr(n).unwrap_or(0) == 0);
        self.buf |= value << self.bits;
        self.bits += n;
        if self.bits >= 64 {
            self.out.extend_from_slice(&self.buf.to_le_bytes());
            self.bits -= 64;
            // The bits of `value` that did not fit (none when it ended exactly at 64). At least
            // 4 bits were pending, so the shift is under 64.
            self.buf = value >> (n - self.bits);
        }
    }

    /// Pads with zero bits to a byte boundary and appends the last bytes.
    fn finish(self) {
        let bytes = self.bits.div_ceil(8) as usize;
        self.out.extend_from_slice(&self.buf.to_le_bytes()[..bytes]);
    }
}

/// Writes tokens with a band's Huffman code.
struct Emit<'a> {
    w: BitWriter<'a>,
    codes: &'a [u64; LITLEN],
    lens: &'a [u32; LITLEN],
}

impl Emit<'_> {
    /// Four literals' codes as one value (at most 4 x 15 = 60 bits).
    #[inline(always)]
    fn pack4(&self, b: &[u8]) -> (u64, u32) {
        let (c, l) = (self.codes, self.lens);
        let (l0, l1, l2) = (l[b[0] as usize], l[b[1] as usize], l[b[2] as usize]);
        let bits = c[b[0] as usize]
            | c[b[1] as usize] << l0
            | c[b[2] as usize] << (l0 + l1)
            | c[b[3] as usize] << (l0 + l1 + l2);
        (bits, l0 + l1 + l2 + l[b[3] as usize])
    }
}

impl Tokens for Emit<'_> {
    #[inline(always)]
    fn literal(&mut self, byte: u8) {
        let i = byte as usize;
        self.w.put(self.codes[i], self.lens[i]);
    }
    #[inline(always)]
    fn literals8(&mut self, bytes: &[u8; 8]) {
        let (bits, n) = self.pack4(&bytes[..4]);
        self.w.put(bits, n);
        let (bits, n) = self.pack4(&bytes[4..]);
        self.w.put(bits, n);
    }
    #[inline]
    fn repeat(&mut self, len: usize) {
        let i = length_index(len);
        let sym = LEN_SYMBOL_BASE + i;
        self.w.put(self.codes[sym], self.lens[sym]);
        self.w.put((len - LEN_BASE[i] as usize) as u64, LEN_EXTRA[i] as u32);
        self.w.put(0, 1); // distance code 0: distance 1
    }
}

/// Compresses `data` (rows of `row_len` bytes) as non-final deflate blocks ending on a byte
/// boundary: one dynamic-Huffman block closed by an empty stored block (a sync flush), or
/// stored blocks when that is smaller.
fn deflate_block(data: &[u8], row_len: usize) -> Vec<u8> {
    let mut counts = Counts {
        freq: [0; LITLEN],
        extra_bits: 0,
    };
    let rows = data.len().div_ceil(row_len);
    let counted = rows.div_ceil(SAMPLE_EVERY);
    for row in data.chunks(row_len).step_by(SAMPLE_EVERY) {
        tokenize(row, &mut counts);
    }
    // Every literal and length gets a code, so the rows not counted may hold anything.
    counts.freq.iter_mut().for_each(|f| *f += 1);
    let lens = code_lengths(&counts.freq, MAX_BITS);
    let header = DynamicHeader::new(&lens);
    let sampled_bits: u64 = counts
        .freq
        .iter()
        .zip(&lens)
        .map(|(&f, &l)| (f - 1) * l as u64)
        .sum::<u64>()
        + counts.extra_bits;
    let estimate = (header.bits() + sampled_bits * rows as u64 / counted as u64) / 8;
    let stored_bytes = data.len() + 5 * data.len().div_ceil(0xFFFF).max(1);
    if stored_bytes as u64 <= estimate {
        return stored(data);
    }
    let mut codes = [0u64; LITLEN];
    let mut widths = [0u32; LITLEN];
    for (i, (c, l)) in canonical_codes(&lens).into_iter().zip(&lens).enumerate() {
        (codes[i], widths[i]) = (c as u64, *l as u32);
    }
    let mut out = Vec::with_capacity(estimate as usize * 9 / 8 + 64);
    let mut emit = Emit {
        w: BitWriter::new(&mut out),
        codes: &codes,
        lens: &widths,
    };
    header.write(&mut emit.w);
    tokenize(data, &mut emit);
    emit.w.put(codes[EOB], widths[EOB]);
    emit.w.put(0, 3); // BFINAL=0, BTYPE=00: the empty stored block of a sync flush
    emit.w.finish();
    out.extend_from_slice(&[0x00, 0x00, 0xFF, 0xFF]);
    // The sample can mislead (a band of noise below a counted flat row): never grow the data.
    if out.len() > stored_bytes { stored(data) } else { out }
}

/// Non-final stored blocks of up to 65535 bytes. They start on a byte boundary, so each
/// header (BFINAL=0, BTYPE=00 and the padding) is one zero byte.
fn stored(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 5 * (data.len() / 0xFFFF + 1));
    // A band holds at least one row of at least two bytes, so there is always a block.
    debug_assert!(!data.is_empty());
    for block in data.chunks(0xFFFF) {
        let len = block.len() as u16;
        out.push(0);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
    out
}

/// The header of a dynamic-Huffman block: its code lengths, run-length coded with a
/// code-length code (RFC 1951 3.2.7). Distances use two one-bit codes, of which only
/// distance 1 occurs (a complete code, which every inflater accepts).
struct DynamicHeader {
    nlit: usize,
    /// Code-length symbols with their extra bits: (symbol, extra value, extra bit count).
    items: Vec<(u8, u8, u8)>,
    cl_lens: Vec<u8>,
    ncl: usize,
}

impl DynamicHeader {
    fn new(lens: &[u8]) -> DynamicHeader {
        let nlit = lens
            .iter()
            .rposition(|&l| l > 0)
            .map_or(0, |i| i + 1)
            .max(LEN_SYMBOL_BASE);
        let mut all = lens[..nlit].to_vec();
        all.extend_from_slice(&[1, 1]);
        let items = run_length(&all);
        let mut cl_freq = [0u64; 19];
        for &(sym, _, _) in &items {
            cl_freq[sym as usize] += 1;
        }
        let cl_lens = code_lengths(&cl_freq, MAX_CL_BITS);
        let ncl = CL_ORDER
            .iter()
            .rposition(|&s| cl_lens[s] > 0)
            .map_or(0, |i| i + 1)
            .max(4);
        DynamicHeader {
            nlit,
            items,
            cl_lens,
            ncl,
        }
    }

    fn bits(&self) -> u64 {
        let items: u64 = self
            .items
            .iter()
            .map(|&(sym, _, extra)| self.cl_lens[sym as usize] as u64 + extra as u64)
            .sum();
        3 + 5 + 5 + 4 + 3 * self.ncl as u64 + items
    }

    fn write(&self, w: &mut BitWriter<'_>) {
        w.put(0, 1); // BFINAL: more blocks follow
        w.put(2, 2); // BTYPE: dynamic Huffman
        w.put((self.nlit - LEN_SYMBOL_BASE) as u64, 5);
        w.put(1, 5); // two distance codes
        w.put((self.ncl - 4) as u64, 4);
        for &sym in &CL_ORDER[..self.ncl] {
            w.put(self.cl_lens[sym] as u64, 3);
        }
        let codes = canonical_codes(&self.cl_lens);
        for &(sym, value, extra) in &self.items {
            w.put(codes[sym as usize] as u64, self.cl_lens[sym as usize] as u32);
            w.put(value as u64, extra as u32);
        }
    }
}

/// Run-length codes a sequence of code lengths with symbols 16 (repeat the previous 3-6
/// times), 17 (3-10 zeros) and 18 (11-138 zeros).
fn run_length(lens: &[u8]) -> Vec<(u8, u8, u8)> {
    let mut items = Vec::new();
    let mut i = 0;
    while i < lens.len() {
        let v = lens[i];
        let same = lens[i..].iter().take_while(|&&l| l == v).count();
        let mut left = same;
        if v == 0 {
            while left >= 11 {
                let n = left.min(138);
                items.push((18, (n - 11) as u8, 7));
                left -= n;
            }
            if left >= 3 {
                items.push((17, (left - 3) as u8, 3));
                left = 0;
            }
        } else {
            items.push((v, 0, 0));
            left -= 1;
            while left >= 3 {
                let n = left.min(6);
                items.push((16, (n - 3) as u8, 2));
                left -= n;
            }
        }
        items.extend(std::iter::repeat_n((v, 0, 0), left));
        i += same;
    }
    items
}

/// Huffman code lengths for `freq`, none longer than `limit`. Symbols that never occur get
/// no code; a lone used symbol gets a one-bit code, and so does an unused partner, so the code
/// is always complete.
fn code_lengths(freq: &[u64], limit: u8) -> Vec<u8> {
    let mut lens = vec![0u8; freq.len()];
    // The used symbols, rarest first.
    let mut symbols: Vec<usize> = (0..freq.len()).filter(|&s| freq[s] > 0).collect();
    symbols.sort_by_key(|&s| (freq[s], s));
    match symbols[..] {
        [] => return lens,
        [only] => {
            lens[only] = 1;
            lens[usize::from(only == 0)] = 1;
            return lens;
        }
        _ => {}
    }
    let weights: Vec<u64> = symbols.iter().map(|&s| freq[s]).collect();
    let depths = tree_depths(&weights);
    let limit = limit as usize;
    let deepest = depths.iter().copied().max().unwrap_or(0).max(limit);
    let mut count = vec![0usize; deepest + 1];
    for &d in &depths {
        count[d] += 1;
    }
    // Too deep: lift leaves two at a time (JPEG's Annex K.3 adjustment, which keeps the code
    // complete): one of the pair takes its parent's place, the other becomes the sibling of the
    // deepest leaf that is at least two levels up.
    for i in (limit + 1..=deepest).rev() {
        while count[i] > 0 {
            let mut j = i - 2;
            while count[j] == 0 {
                j -= 1;
            }
            count[i] -= 2;
            count[i - 1] += 1;
            count[j + 1] += 2;
            count[j] -= 1;
        }
    }
    // The rarest symbols take the longest codes.
    let mut rarest = symbols.iter();
    for depth in (1..=limit).rev() {
        for &s in rarest.by_ref().take(count[depth]) {
            lens[s] = depth as u8;
        }
    }
    lens
}

/// Depths of the leaves of an optimal (unlimited) Huffman tree over `weights`, which ascend.
/// Two queues: the leaves in order, and the inner nodes, which are made in ascending weight.
fn tree_depths(weights: &[u64]) -> Vec<usize> {
    let n = weights.len();
    let mut weight = weights.to_vec();
    let mut parent = vec![0usize; 2 * n - 1];
    let (mut leaf, mut inner) = (0, n);
    for node in n..2 * n - 1 {
        let mut lightest = || {
            if leaf < n && (inner == node || weight[leaf] <= weight[inner]) {
                leaf += 1;
                leaf - 1
            } else {
                inner += 1;
                inner - 1
            }
        };
        let (a, b) = (lightest(), lightest());
        parent[a] = node;
        parent[b] = node;
        weight.push(weight[a] + weight[b]);
    }
    // A parent always comes after its children: fill depths from the root down.
    let mut depth = vec![0usize; 2 * n - 1];
    for node in (0..2 * n - 2).rev() {
        depth[node] = depth[parent[node]] + 1;
    }
    depth.truncate(n);
    depth
}

/// Canonical Huffman codes for `lens` (RFC 1951 3.2.2), bit-reversed for LSB-first output.
fn canonical_codes(lens: &[u8]) -> Vec<u16> {
    let mut count = [0u16; 16];
    for &l in lens.iter().filter(|&&l| l > 0) {
        count[l as usize] += 1;
    }
    let mut next = [0u16; 16];
    let mut code = 0u16;
    for bits in 1..16 {
        code = (code + count[bits - 1]) << 1;
        next[bits] = code;
    }
    lens.iter()
        .map(|&l| {
            if l == 0 {
                return 0;
            }
            let c = next[l as usize];
            next[l as usize] += 1;
            c.reverse_bits() >> (16 - l)
        })
        .collect()
}

/// The Adler-32 of `a ++ b` from the checksums of both and the length of `b`.
fn adler32_combine(a: u32, b: u32, b_len: usize) -> u32 {
    let (a_sum, a_acc) = (a & 0xFFFF, a >> 16);
    let (b_sum, b_acc) = (b & 0xFFFF, b >> 16);
    let len = (b_len % ADLER_MOD as usize) as u64;
    // Each of b's running sums also carries a's byte total (a_sum - 1).
    let sum = (a_sum + b_sum + ADLER_MOD - 1) % ADLER_MOD;
    let acc = (a_acc as u64 + b_acc as u64 + len * ((a_sum + ADLER_MOD - 1) % ADLER_MOD) as u64) % ADLER_MOD as u64;
    ((acc as u32) << 16) | sum
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    /// A deterministic byte stream (xorshift), for noise that does not compress.
    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Splits a PNG into (kind, data) chunks, checking every CRC.
    fn chunks(png: &[u8]) -> Vec<([u8; 4], Vec<u8>)> {
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let mut out = Vec::new();
        let mut i = 8;
        while i < png.len() {
            let len = u32::from_be_bytes(png[i..i + 4].try_into().unwrap()) as usize;
            let body = &png[i + 4..i + 8 + len];
            let crc = u32::from_be_bytes(png[i + 8 + len..i + 12 + len].try_into().unwrap());
            assert_eq!(crc, crc32fast::hash(body), "chunk CRC");
            out.push((body[..4].try_into().unwrap(), body[4..].to_vec()));
            i += 12 + len;
        }
        out
    }

    /// Writes `pixels` and reads them back two ways: through the `image` crate's decoder, and
    /// by inflating the IDAT stream with a strict zlib decoder (which checks the Adler-32).
    fn round_trip(pixels: &[u8], w: u32, h: u32, channels: usize) -> Vec<u8> {
        let stride = w as usize * channels;
        let png = write_png(w, h, channels, |y, row| {
            row.copy_from_slice(&pixels[y * stride..][..stride])
        });
        let parts = chunks(&png);
        assert_eq!(&parts[0].0, b"IHDR");
        assert_eq!(&parts.last().unwrap().0, b"IEND");
        let idat: Vec<u8> = parts
            .iter()
            .filter(|(k, _)| k == b"IDAT")
            .flat_map(|(_, d)| d.clone())
            .collect();
        let mut inflated = Vec::new();
        flate2::read::ZlibDecoder::new(&idat[..])
            .read_to_end(&mut inflated)
            .unwrap();
        assert_eq!(inflated.len(), h as usize * (stride + 1));
        let decoded = image::load_from_memory_with_format(&png, image::ImageFormat::Png).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (w, h));
        assert_eq!(decoded.color().channel_count() as usize, channels);
        assert_eq!(decoded.as_bytes(), pixels, "{w}x{h}x{channels}");
        png
    }

    #[test]
    fn every_layout_and_content_reads_back_exactly() {
        for channels in 1..=4 {
            for (w, h) in [(1, 1), (1, 9), (7, 3), (33, 17), (600, 300)] {
                let n = w as usize * h as usize * channels;
                let flat = vec![200u8; n];
                let gradient: Vec<u8> = (0..n).map(|i| (i / channels % 251) as u8).collect();
                let mut mixed = noise(n, 7);
                // Stretches of zeros of every length from 1 to 700 (runs, their splits at 258,
                // tails of one and two) at every alignment.
                let mut i = 0;
                let mut len = 1;
                while i + len < n {
                    mixed[i..i + len].fill(0);
                    i += 2 * len + 3;
                    len = len % 700 + 1;
                }
                for pixels in [flat, gradient, noise(n, 3), mixed] {
                    round_trip(&pixels, w, h, channels);
                }
            }
        }
    }

    #[test]
    fn flat_images_compress_and_noise_falls_back_to_stored_blocks() {
        let (w, h) = (1000u32, 700u32); // 2.8 MB of RGBA: six bands
        let n = (w * h * 4) as usize;
        let flat = round_trip(&vec![90u8; n], w, h, 4);
        assert!(flat.len() < n / 200, "flat image took {} bytes", flat.len());
        let noisy = round_trip(&noise(n, 11), w, h, 4);
        // Stored blocks: the filtered bytes plus framing, never more.
        assert!(
            noisy.len() < n + n / 100 && noisy.len() > n,
            "noise took {} bytes",
            noisy.len()
        );
        let idats = chunks(&noisy).iter().filter(|(k, _)| k == b"IDAT").count();
        assert_eq!(
            idats,
            (n + h as usize).div_ceil(BAND_BYTES / (w as usize * 4 + 1) * (w as usize * 4 + 1))
        );
    }

    /// Expands tokens back into bytes.
    struct Expand(Vec<u8>);
    impl Tokens for Expand {
        fn literal(&mut self, byte: u8) {
            self.0.push(byte);
        }
        fn repeat(&mut self, len: usize) {
            assert!((3..=258).contains(&len), "match length {len}");
            let last = *self.0.last().expect("a repeat follows a literal");
            self.0.extend(std::iter::repeat_n(last, len));
        }
    }

    #[test]
    fn tokens_expand_to_the_input() {
        for run in 0..1100 {
            for offset in 0..9 {
                let mut data = noise(offset + run + 9, run as u64 + 1);
                data.iter_mut().for_each(|b| *b |= 1);
                data[offset..offset + run].fill(0);
                let mut out = Expand(Vec::new());
                tokenize(&data, &mut out);
                assert_eq!(out.0, data, "run {run} at {offset}");
            }
        }
    }

    #[test]
    fn code_lengths_are_complete_and_limited() {
        // Fibonacci counts make the optimal code as deep as there are symbols.
        let mut fib = vec![1u64, 1];
        while fib.len() < 40 {
            fib.push(fib[fib.len() - 1] + fib[fib.len() - 2]);
        }
        let mut freq = vec![0u64; LITLEN];
        freq[..40].copy_from_slice(&fib);
        freq[EOB] = 1;
        assert!(
            tree_depths(&fib).iter().any(|&d| d > MAX_BITS as usize),
            "the test needs a deep tree"
        );
        for (freq, limit) in [(freq.clone(), MAX_BITS), (freq[..19].to_vec(), MAX_CL_BITS)] {
            let lens = code_lengths(&freq, limit);
            assert!(lens.iter().all(|&l| l <= limit));
            assert!(freq.iter().zip(&lens).all(|(&f, &l)| (f > 0) == (l > 0)));
            let kraft: f64 = lens.iter().filter(|&&l| l > 0).map(|&l| 0.5f64.powi(l as i32)).sum();
            assert_eq!(kraft, 1.0);
        }
        // One used symbol still gets a complete two-code tree.
        let mut one = vec![0u64; 19];
        one[8] = 5;
        let lens = code_lengths(&one, MAX_CL_BITS);
        assert_eq!((lens[8], lens[0], lens.iter().filter(|&&l| l > 0).count()), (1, 1, 2));
    }

    #[test]
    fn adler32_combines_like_one_pass() {
        let data = noise(200_000, 5);
        let whole = simd_adler32::adler32(&data.as_slice());
        for cut in [0, 1, 5552, 65521, 65522, 199_999, 200_000] {
            let (a, b) = data.split_at(cut);
            let joined = adler32_combine(simd_adler32::adler32(&a), simd_adler32::adler32(&b), b.len());
            assert_eq!(joined, whole, "cut at {cut}");
        }
    }
}
