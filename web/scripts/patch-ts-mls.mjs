// Patches two wire-encoding bugs of ts-mls 1.x so it interoperates with OpenMLS (RFC 9420).
// Run by `npm ci` / `npm install` (the package's postinstall). Upstream fixed both in
// 2.0.0-rc.12 (ts-mls #476 and #449); the registry here has only 1.6.4 and 2.0.0-rc.10.
//
// 1. The `external_senders` extension is a *list* (`ExternalSender external_senders<V>`,
//    RFC 9420 §12.1.8.1); ts-mls decodes it as one struct. We add list codecs and make the
//    three places that read the extension decode the list. (Groups we create encode the list
//    with `encodeExternalSenders`.)
// 2. The GroupInfo's `external_pub` extension is `struct { HPKEPublicKey external_pub<V>; }`
//    (§12.4.3.2): the key with its own length prefix inside the extension data. ts-mls writes
//    and reads the bare key.
//
// Besides, two small additions: the sender of an application message (3) and padding to a
// multiple (4), both below.
//
// Every replacement must match exactly once; anything else stops the install with a message,
// so a different ts-mls version never gets half a patch. Applying twice is a no-op (a marker
// is checked first).

import { readFileSync, writeFileSync, existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, "..", "node_modules", "ts-mls");
const MARK = "/* conclave-patched */";
const EXPECTED_VERSION = "1.6.4";

function fail(msg) {
  console.error(`patch-ts-mls: ${msg}`);
  process.exit(1);
}

if (!existsSync(join(root, "package.json"))) {
  fail(`ts-mls is not installed under ${root}; run \`npm ci\` in web/`);
}
const version = JSON.parse(readFileSync(join(root, "package.json"), "utf8")).version;
if (version !== EXPECTED_VERSION) {
  fail(`expected ts-mls ${EXPECTED_VERSION}, found ${version}; check whether the encoding fixes are upstream and update this script`);
}

/** Replaces each [from, to] exactly once in the file (path relative to dist/src). */
function patch(rel, pairs) {
  const path = join(root, "dist", "src", rel);
  let text = readFileSync(path, "utf8");
  if (text.includes(MARK)) return false;
  for (const [from, to] of pairs) {
    const count = text.split(from).length - 1;
    if (count !== 1) fail(`${rel}: expected the text to patch once, found it ${count} times:\n${from}`);
    text = text.replace(from, () => to);
  }
  writeFileSync(path, `${MARK}\n${text}`);
  return true;
}

let changed = 0;

// --- 1. external_senders is a list -----------------------------------------------------------
changed += patch("externalSender.js", [
  [
    `import { decodeVarLenData, varLenDataEncoder } from "./codec/variableLength.js";`,
    `import { decodeVarLenData, varLenDataEncoder, decodeVarLenType, varLenTypeEncoder } from "./codec/variableLength.js";`,
  ],
  [
    `export const decodeExternalSender = mapDecoders([decodeVarLenData, decodeCredential], (signaturePublicKey, credential) => ({ signaturePublicKey, credential }));`,
    `export const decodeExternalSender = mapDecoders([decodeVarLenData, decodeCredential], (signaturePublicKey, credential) => ({ signaturePublicKey, credential }));
/** The extension's data: a list of external senders. */
export const externalSendersEncoder = varLenTypeEncoder(externalSenderEncoder);
export const encodeExternalSenders = encode(externalSendersEncoder);
export const decodeExternalSenders = (b, offset) => {
    try {
        return decodeVarLenType(decodeExternalSender)(b, offset);
    }
    catch {
        return undefined;
    }
};`,
  ],
]);
changed += patch("externalSender.d.ts", [
  [
    `export declare const decodeExternalSender: Decoder<ExternalSender>;`,
    `export declare const decodeExternalSender: Decoder<ExternalSender>;
export declare const externalSendersEncoder: BufferEncoder<ExternalSender[]>;
export declare const encodeExternalSenders: Encoder<ExternalSender[]>;
export declare const decodeExternalSenders: Decoder<ExternalSender[]>;`,
  ],
]);
changed += patch("index.js", [
  [
    `export { decodeExternalSender, encodeExternalSender } from "./externalSender.js";`,
    `export { decodeExternalSender, encodeExternalSender, decodeExternalSenders, encodeExternalSenders } from "./externalSender.js";`,
  ],
]);
changed += patch("index.d.ts", [
  [
    `export { decodeExternalSender, encodeExternalSender, type ExternalSender } from "./externalSender.js";`,
    `export { decodeExternalSender, encodeExternalSender, decodeExternalSenders, encodeExternalSenders, type ExternalSender } from "./externalSender.js";`,
  ],
]);
changed += patch("publicMessage.js", [
  [
    `import { decodeExternalSender } from "./externalSender.js";`,
    `import { decodeExternalSenders } from "./externalSender.js";`,
  ],
  [
    `    const externalSenderExtensions = extensions.filter((ex) => ex.extensionType === "external_senders");
    const externalSenderExtension = externalSenderExtensions[senderIndex];
    if (externalSenderExtension !== undefined) {
        const externalSender = decodeExternalSender(externalSenderExtension.extensionData, 0);
        if (externalSender === undefined)
            throw new CodecError("Could not decode ExternalSender");
        return externalSender[0];
    }`,
    `    const externalSenderExtension = extensions.find((ex) => ex.extensionType === "external_senders");
    if (externalSenderExtension !== undefined) {
        const externalSenders = decodeExternalSenders(externalSenderExtension.extensionData, 0);
        if (externalSenders === undefined)
            throw new CodecError("Could not decode ExternalSender");
        return externalSenders[0][senderIndex];
    }`,
  ],
]);
changed += patch("clientState.js", [
  [
    `import { decodeExternalSender } from "./externalSender.js";`,
    `import { decodeExternalSenders } from "./externalSender.js";`,
  ],
  [
    `        const decoded = decodeExternalSender(externalSender.extensionData, 0);
        if (decoded === undefined)
            return new CodecError("Could not decode external_senders");
        const validCredential = await authService.validateCredential(decoded[0].credential, decoded[0].signaturePublicKey);
        if (!validCredential)
            return new ValidationError("Could not validate external credential");`,
    `        const decoded = decodeExternalSenders(externalSender.extensionData, 0);
        if (decoded === undefined)
            return new CodecError("Could not decode external_senders");
        for (const sender of decoded[0]) {
            const validCredential = await authService.validateCredential(sender.credential, sender.signaturePublicKey);
            if (!validCredential)
                return new ValidationError("Could not validate external credential");
        }`,
  ],
]);
changed += patch("externalProposal.js", [
  [
    `import { decodeExternalSender } from "./externalSender.js";`,
    `import { decodeExternalSenders } from "./externalSender.js";`,
  ],
  [
    `    const externalSenderExtensionIndex = groupInfo.groupContext.extensions.findIndex((ex) => {
        if (ex.extensionType !== "external_senders")
            return false;
        const decoded = decodeExternalSender(ex.extensionData, 0);
        if (decoded === undefined)
            throw new ValidationError("Could not decode external_sender extension");
        return constantTimeEqual(decoded[0].signaturePublicKey, signaturePublicKey);
    });`,
    `    const externalSendersExtension = groupInfo.groupContext.extensions.find((ex) => ex.extensionType === "external_senders");
    let externalSenderExtensionIndex = -1;
    if (externalSendersExtension !== undefined) {
        const decoded = decodeExternalSenders(externalSendersExtension.extensionData, 0);
        if (decoded === undefined)
            throw new ValidationError("Could not decode external_sender extension");
        externalSenderExtensionIndex = decoded[0].findIndex((s) => constantTimeEqual(s.signaturePublicKey, signaturePublicKey));
    }`,
  ],
]);

// --- 2. external_pub carries its own length prefix -------------------------------------------
changed += patch("createCommit.js", [
  [
    `import { encode } from "./codec/tlsEncoder.js";`,
    `import { encode } from "./codec/tlsEncoder.js";
import { decodeVarLenData as conclaveDecodeVarLenData, varLenDataEncoder as conclaveVarLenDataEncoder } from "./codec/variableLength.js";`,
  ],
  [
    `    const gi = await createGroupInfo(state.groupContext, state.confirmationTag, state, [...extensions, { extensionType: "external_pub", extensionData: externalPub }], cs);`,
    `    const gi = await createGroupInfo(state.groupContext, state.confirmationTag, state, [...extensions, { extensionType: "external_pub", extensionData: encode(conclaveVarLenDataEncoder)(externalPub) }], cs);`,
  ],
  [
    `        { extensionType: "external_pub", extensionData: externalPub },
        { extensionType: "ratchet_tree", extensionData: encodedTree },`,
    `        { extensionType: "external_pub", extensionData: encode(conclaveVarLenDataEncoder)(externalPub) },
        { extensionType: "ratchet_tree", extensionData: encodedTree },`,
  ],
  [
    `    const { enc, secret: initSecret } = await exportSecret(externalPub.extensionData, cs);`,
    `    const externalPubKey = conclaveDecodeVarLenData(externalPub.extensionData, 0);
    if (externalPubKey === undefined || externalPubKey[1] !== externalPub.extensionData.length)
        throw new UsageError("Could not decode the external_pub extension");
    const { enc, secret: initSecret } = await exportSecret(externalPubKey[0], cs);`,
  ],
]);

// --- 3. the sender of an application message ---------------------------------------------------
// ts-mls 1.x returns an application message without saying which leaf sent it; the client needs
// the sender's credential to check it against the account the server names. Added as extra
// fields (`senderLeafIndex`, `senderCredential`) of the result; nothing else changes.
changed += patch("processMessages.js", [
  [
    `            if (result.content.content.contentType === "application") {
                return {
                    kind: "applicationMessage",
                    message: result.content.content.applicationData,
                    newState,
                    consumed: result.consumed,
                };`,
    `            if (result.content.content.contentType === "application") {
                return {
                    kind: "applicationMessage",
                    message: result.content.content.applicationData,
                    newState,
                    consumed: result.consumed,
                    ...conclaveSenderOf(result.content.content.sender, receiverData.ratchetTree),
                };`,
  ],
  [
    `    if (result.content.content.contentType === "application") {
        return {
            kind: "applicationMessage",
            message: result.content.content.applicationData,
            newState: updatedState,
            consumed: result.consumed,
        };`,
    `    if (result.content.content.contentType === "application") {
        return {
            kind: "applicationMessage",
            message: result.content.content.applicationData,
            newState: updatedState,
            consumed: result.consumed,
            ...conclaveSenderOf(result.content.content.sender, state.ratchetTree),
        };`,
  ],
  [
    `export async function processPrivateMessage(`,
    `function conclaveSenderOf(sender, tree) {
    if (sender.senderType !== "member")
        return { senderLeafIndex: undefined, senderCredential: undefined };
    const node = tree[sender.leafIndex * 2];
    return {
        senderLeafIndex: sender.leafIndex,
        senderCredential: node !== undefined && node.nodeType === "leaf" ? node.leaf.credential : undefined,
    };
}
export async function processPrivateMessage(`,
  ],
]);
changed += patch("processMessages.d.ts", [
  [
    `    kind: "applicationMessage";
    message: Uint8Array;`,
    `    kind: "applicationMessage";
    message: Uint8Array;
    senderLeafIndex?: number;
    senderCredential?: import("./credential.js").Credential;`,
  ],
]);

// --- 4. padding to a multiple, as OpenMLS pads ---------------------------------------------------
// OpenMLS's `padding_size(256)` pads every application message so that its content and the
// AEAD tag (`overhead`) are a multiple of 256 bytes;
// ts-mls 1.x can only pad up to a fixed length (or by a fixed amount), which leaves the length
// of longer messages visible. A third kind, `padToMultiple`, does what OpenMLS does.
changed += patch("paddingConfig.js", [
  [
    `export function byteLengthToPad(encodedLength, config) {
    if (config.kind === "alwaysPad")`,
    `export function byteLengthToPad(encodedLength, config) {
    if (config.kind === "padToMultiple")
        return (config.multiple - ((encodedLength + config.overhead) % config.multiple)) % config.multiple;
    if (config.kind === "alwaysPad")`,
  ],
]);
changed += patch("paddingConfig.d.ts", [
  [
    `} | {
    kind: "alwaysPad";
    paddingLength: number;
};`,
    `} | {
    kind: "alwaysPad";
    paddingLength: number;
} | {
    kind: "padToMultiple";
    multiple: number;
    overhead: number;
};`,
  ],
]);

console.log(changed > 0 ? `patch-ts-mls: patched ts-mls ${version} (${changed} files)` : "patch-ts-mls: already patched");
