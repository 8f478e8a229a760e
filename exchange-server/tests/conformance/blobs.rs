//! Blobs: payloads kept by the exchange for a mailbox's owner, put and read
//! in chunks, given to whoever holds their key, freed when deleted, when
//! their owner's mailbox is terminated, or at their TTL.
//!
//! docs/design.md, "Blobs".

use super::harness::*;
use super::ownership::{ALICE, BOB, Bearer};
use academy_proto::pb::blob_service_client::BlobServiceClient;
use sha2::{Digest as _, Sha256};

const MIB: usize = 1 << 20;

/// Bytes that differ from place to place, so an offset off by one shows.
fn bytes(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// Puts `data` in frames of `frame` bytes (the first carrying none),
/// declaring `size`.
async fn put<T>(
    blobs: &mut BlobServiceClient<T>,
    owner: &str,
    size: u64,
    data: &[u8],
    frame: usize,
) -> Result<pb::PutBlobResponse, tonic::Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let head = pb::PutBlobRequest { owner: owner.into(), size, ..Default::default() };
    let body = data
        .chunks(frame.max(1))
        .map(|c| pb::PutBlobRequest { data: c.to_vec().into(), ..Default::default() });
    let requests: Vec<_> = std::iter::once(head).chain(body).collect();
    blobs.put_blob(tokio_stream::iter(requests)).await.map(tonic::Response::into_inner)
}

/// The blob's first answer and its bytes, read from `offset`.
async fn get<T>(
    blobs: &mut BlobServiceClient<T>,
    key: &str,
    offset: u64,
) -> Result<(pb::GetBlobResponse, Vec<u8>), tonic::Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let request = pb::GetBlobRequest { key: key.into(), offset };
    let mut frames = blobs.get_blob(request).await?.into_inner();
    let head = frames.message().await?.expect("a first answer");
    assert!(head.data.is_empty(), "the first answer says what the blob is");
    let mut data = Vec::new();
    while let Some(frame) = frames.message().await? {
        assert!(frame.data.len() <= MIB, "chunks of at most 1 MiB");
        data.extend_from_slice(&frame.data);
    }
    Ok((head, data))
}

async fn blobs_of(h: &Harness) -> BlobServiceClient<Channel> {
    BlobServiceClient::connect(h.server.url()).await.unwrap()
}

/// What the store holds, once background work settled.
async fn usage(h: &Harness) -> academy_exchange::BlobUsage {
    h.server.exchange().blob_usage().await.unwrap()
}

pub(crate) async fn blobs_are_put_read_in_chunks_and_freed(store: Store) {
    let mut h = start(store).await;
    let mut blobs = blobs_of(&h).await;
    let owner = h.client().await;
    let data = bytes(2 * MIB + MIB / 2 + 7);
    // Frames of odd sizes: the exchange keeps whole chunks all the same.
    let kept = put(&mut blobs, &owner, data.len() as u64, &data, 700_001).await.unwrap();
    let blob = kept.blob.unwrap();
    assert_eq!(blob.store, "exchange");
    assert_eq!(blob.size, data.len() as u64);
    assert_eq!(blob.sha256, Sha256::digest(&data).to_vec());
    assert!(kept.expires_in.unwrap().seconds > 0);
    assert_eq!(usage(&h).await.blobs, 1);

    let (head, read) = get(&mut blobs, &blob.key, 0).await.unwrap();
    assert_eq!((head.size, head.sha256.clone()), (blob.size, blob.sha256.clone()));
    assert!(read == data, "the bytes read are the bytes put");
    let offset = MIB + MIB / 2 + 3;
    let (_, tail) = get(&mut blobs, &blob.key, offset as u64).await.unwrap();
    assert!(tail == data[offset..], "a read from an offset resumes there");
    let (_, none) = get(&mut blobs, &blob.key, data.len() as u64).await.unwrap();
    assert!(none.is_empty());
    let past = get(&mut blobs, &blob.key, data.len() as u64 + 1).await.unwrap_err();
    assert_eq!(past.code(), Code::InvalidArgument, "{}", past.message());

    // A message may carry it; its receiver finds the reference as sent.
    let agent = h.agent("test.Blob", &[]).await;
    let mut m = request(&owner, &agent, "take");
    if let Some(Body::ActionRequest(r)) = &mut m.body {
        let content_type = "application/octet-stream".into();
        r.args = Some(pb::Payload { content_type, blob: Some(blob.clone()), ..Default::default() });
    }
    h.send(m.clone()).await.unwrap();
    let mut sub = h.subscribe(&agent).await;
    let delivered = next(&mut sub).await.remove(0).message.unwrap();
    assert_eq!(delivered.body, m.body);
    // One the exchange cannot have made is refused.
    if let Some(Body::ActionRequest(r)) = &mut m.body {
        r.args.as_mut().unwrap().blob.as_mut().unwrap().store = "elsewhere".into();
    }
    let err = h.send(m).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("blob.store"), "{}", err.message());

    // Deleted: gone for every reader, with an error naming the key.
    let deleted = blobs.delete_blob(pb::DeleteBlobRequest { key: blob.key.clone() }).await;
    assert!(deleted.unwrap().into_inner().deleted);
    let err = get(&mut blobs, &blob.key, 0).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let (why, metadata) = reason(&err);
    assert_eq!((why.as_str(), metadata["key"].as_str()), ("BLOB_NOT_FOUND", blob.key.as_str()));
    assert!(err.message().contains(&blob.key), "{}", err.message());
    let again = blobs.delete_blob(pb::DeleteBlobRequest { key: blob.key.clone() }).await;
    assert!(!again.unwrap().into_inner().deleted, "deleting twice is no error");

    // An empty blob is a blob.
    let empty = put(&mut blobs, &owner, 0, &[], 1).await.unwrap().blob.unwrap();
    let (head, read) = get(&mut blobs, &empty.key, 0).await.unwrap();
    assert_eq!((head.size, read.len()), (0, 0));
    assert_eq!(head.sha256, Sha256::digest(b"").to_vec());
    blobs.delete_blob(pb::DeleteBlobRequest { key: empty.key }).await.unwrap();
    assert_eq!(usage(&h).await, academy_exchange::BlobUsage::default());
}

pub(crate) async fn blob_puts_are_checked_and_a_failed_one_keeps_nothing(store: Store) {
    let limits = Limits {
        max_blob_bytes: 3 * MIB as u64,
        max_blob_store_bytes: 4 * MIB as u64,
        ..Limits::default()
    };
    let mut h = start_with(store, limits).await;
    let mut blobs = blobs_of(&h).await;
    let owner = h.client().await;
    let data = bytes(2 * MIB);

    // Fewer bytes than declared, or more: refused, nothing kept.
    for (size, sent) in [(2 * MIB + 1, 2 * MIB), (MIB, 2 * MIB)] {
        let err = put(&mut blobs, &owner, size as u64, &data[..sent], MIB).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(err.message().contains("not its size"), "{}", err.message());
    }
    // A chunk over 1 MiB (within what the service decodes).
    let err = put(&mut blobs, &owner, 2 * MIB as u64, &data, MIB + 1).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert_eq!(reason(&err).1["limit"], "bytes per blob chunk");
    // A request too large to decode, early or late: the same limit, named.
    for frame in [2 * MIB, MIB] {
        let mut requests = vec![pb::PutBlobRequest {
            owner: owner.clone(),
            size: 2 * MIB as u64,
            ..Default::default()
        }];
        requests
            .push(pb::PutBlobRequest { data: data[..frame].to_vec().into(), ..Default::default() });
        requests.push(pb::PutBlobRequest {
            data: data[..2 * MIB].to_vec().into(),
            ..Default::default()
        });
        let err = blobs.put_blob(tokio_stream::iter(requests)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        let (why, metadata) = reason(&err);
        assert_eq!(
            (why.as_str(), metadata["limit"].as_str()),
            ("LIMIT_EXCEEDED", "bytes per blob chunk")
        );
        assert!(err.message().len() < 200, "{}", err.message());
    }
    // Larger than the largest blob: refused before any byte is kept.
    let err = put(&mut blobs, &owner, 3 * MIB as u64 + 1, &[], 1).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert_eq!(reason(&err).1["limit"], "blob size in bytes");
    // Owners that cannot own one.
    let stranger = EntityId::new_client().to_string();
    let err = put(&mut blobs, &stranger, 1, b"x", 1).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    let err = put(&mut blobs, "not-an-id", 1, b"x", 1).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    // Keys the exchange did not make, short or huge: refused without echo.
    let err = get(&mut blobs, "../etc/passwd", 0).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    let err = get(&mut blobs, &"k".repeat(100_000), 0).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().len() < 200, "{}", err.message());
    assert_eq!(usage(&h).await, academy_exchange::BlobUsage::default(), "failed puts keep nothing");

    // In memory, the store holds at most max_blob_store_bytes.
    let first = put(&mut blobs, &owner, 2 * MIB as u64, &data, MIB).await.unwrap();
    let second = put(&mut blobs, &owner, 2 * MIB as u64, &data, MIB).await;
    let third = put(&mut blobs, &owner, 1, b"x", 1).await;
    match store {
        Store::Memory => {
            second.unwrap();
            let err = third.unwrap_err();
            assert_eq!(err.code(), Code::ResourceExhausted);
            assert_eq!(reason(&err).0, "BLOB_STORE_FULL");
        }
        // Over Redis, Redis's maxmemory bounds them.
        Store::Redis => drop((second.unwrap(), third.unwrap())),
    }
    // Terminating the owner frees its blobs.
    h.terminate(&owner).await;
    let err = get(&mut blobs, &first.blob.unwrap().key, 0).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(usage(&h).await, academy_exchange::BlobUsage::default());
    let err = put(&mut blobs, &owner, 1, b"x", 1).await.unwrap_err();
    // (A client leaves no gravestone: its id is simply unknown now.)
    assert_eq!(err.code(), Code::NotFound, "a terminated mailbox owns nothing new");
}

pub(crate) async fn blobs_expire_at_their_ttl(store: Store) {
    let limits = Limits { blob_ttl: Duration::from_millis(700), ..Limits::default() };
    let mut h = start_with(store, limits).await;
    let mut blobs = blobs_of(&h).await;
    let owner = h.client().await;
    let data = bytes(MIB + 1);
    let kept = put(&mut blobs, &owner, data.len() as u64, &data, MIB).await.unwrap();
    let expires_in = kept.expires_in.unwrap();
    assert_eq!(
        (expires_in.seconds, expires_in.nanos),
        (0, 700_000_000),
        "at most the exchange's TTL"
    );
    let key = kept.blob.unwrap().key;
    get(&mut blobs, &key, 0).await.unwrap();
    tokio::time::sleep(Duration::from_millis(900)).await;
    let err = get(&mut blobs, &key, 0).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    assert_eq!(usage(&h).await, academy_exchange::BlobUsage::default(), "expired chunks go too");
}

pub(crate) async fn blobs_belong_to_whoever_may_send_from_their_owner(store: Store) {
    let tokens = Tokens::parse(&format!("alice {ALICE}\nbob {BOB}\n")).unwrap();
    let h = start_as(store, ExchangeOptions { tokens: Some(tokens), ..Default::default() }).await;
    let channel = Channel::from_shared(h.server.url()).unwrap().connect().await.unwrap();
    let rpc = |token| ExchangeServiceClient::with_interceptor(channel.clone(), Bearer(token));
    let blob_rpc = |token| BlobServiceClient::with_interceptor(channel.clone(), Bearer(token));
    let mut alice = rpc(ALICE);
    let owner = alice.register_client(pb::RegisterClientRequest::default()).await.unwrap();
    let owner = owner.into_inner().client_id;
    let (mut alices, mut bobs) = (blob_rpc(ALICE), blob_rpc(BOB));

    let err = put(&mut bobs, &owner, 1, b"x", 1).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    let mut nobody = BlobServiceClient::new(channel.clone());
    let err = put(&mut nobody, &owner, 1, b"x", 1).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let key = put(&mut alices, &owner, 3, b"abc", 3).await.unwrap().blob.unwrap().key;
    let err = get(&mut nobody, &key, 0).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // Its key is what lets one read it: whoever alice gives it to.
    let (_, read) = get(&mut bobs, &key, 0).await.unwrap();
    assert_eq!(read, b"abc");
}
