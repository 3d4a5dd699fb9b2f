// Independent tokenizer reference for model/tests/tokenizer_reference_test.cc.
// Usage: node tokenizer_reference.mjs TOKENIZER_DIR CORPUS_FILE OUT_JSON
// Loads TOKENIZER_DIR/tokenizer.json (+ tokenizer_config.json) into HuggingFace's tokenizers.js
// (@huggingface/tokenizers, no network) and writes, for every case of the corpus, the token ids
// with and without special tokens and the decoded text with and without special tokens.
// Corpus: one case per line, escapes \n \r \t \\ \uXXXX \UXXXXXXXX, '#' lines are comments.
// Extra cases: the whole corpus joined by newlines, and neighbouring lines joined by " \n\t".
import fs from "node:fs";
import path from "node:path";
import { Tokenizer } from "@huggingface/tokenizers";

const [dir, corpusFile, outFile] = process.argv.slice(2);
if (!dir || !corpusFile || !outFile) {
  console.error("usage: node tokenizer_reference.mjs TOKENIZER_DIR CORPUS_FILE OUT_JSON");
  process.exit(2);
}

function unescape(line) {
  let out = "";
  for (let i = 0; i < line.length; ++i) {
    const c = line[i];
    if (c !== "\\" || i + 1 >= line.length) { out += c; continue; }
    const e = line[++i];
    if (e === "n") out += "\n";
    else if (e === "r") out += "\r";
    else if (e === "t") out += "\t";
    else if (e === "\\") out += "\\";
    else if (e === "u") { out += String.fromCodePoint(parseInt(line.substr(i + 1, 4), 16)); i += 4; }
    else if (e === "U") { out += String.fromCodePoint(parseInt(line.substr(i + 1, 8), 16)); i += 8; }
    else out += "\\" + e;
  }
  return out;
}

const lines = fs.readFileSync(corpusFile, "utf8").split("\n");
if (lines.length && lines[lines.length - 1] === "") lines.pop();
const texts = lines.filter((l) => !l.startsWith("#")).map(unescape);
const cases = [...texts, texts.join("\n")];
for (let i = 0; i + 1 < texts.length; i += 2) cases.push(texts[i] + " \n\t" + texts[i + 1]);

const tokenizerJson = JSON.parse(fs.readFileSync(path.join(dir, "tokenizer.json"), "utf8"));
const configPath = path.join(dir, "tokenizer_config.json");
const config = fs.existsSync(configPath) ? JSON.parse(fs.readFileSync(configPath, "utf8")) : {};
const tok = new Tokenizer(tokenizerJson, config);

// tokenizers.js rejects an empty id list; its decoding is "" by definition.
const decode = (ids, skip) =>
  ids.length === 0 ? "" : tok.decode(ids, { skip_special_tokens: skip, clean_up_tokenization_spaces: false });
const out = cases.map((text) => {
  const ids = tok.encode(text, { add_special_tokens: false }).ids;
  const idsWithSpecial = tok.encode(text, { add_special_tokens: true }).ids;
  return {
    text,
    ids,
    ids_with_special: idsWithSpecial,
    decoded: decode(ids, false),
    decoded_with_special: decode(idsWithSpecial, false),
    decoded_skip_special: decode(idsWithSpecial, true),
  };
});
fs.writeFileSync(outFile, JSON.stringify({ tokenizer: dir, cases: out }));
