// labelgrid's gRPC services from Java, with the code protoc's java and grpc-java plugins
// generate from protos/ (see the README's "Clients" section and `make java-client`).
//
//   java -cp CLASSPATH io.labelgrid.example.LabelgridClient [--target HOST:PORT] [--token T]
//        [--timeout-s N] COMMAND [flags]
//
//   models                                            list the models inference serves
//   upload --file F [--image-id ID]                   upload a NIfTI file (1 MiB chunks, then its sha256)
//   infer --model M --image ID --out F [--save-tag T] run a model, stream the label to F, verify its sha256
//   download-label --image ID [--tag final] --out F   download a stored label to F, verify its sha256
//   next-sample --client-id C [--strategy random]     the next image active learning hands C
//
// Each result is one JSON object per line on stdout. An RPC error prints
// {"error": {"code": ..., "message": ...}} on stderr and exits 1; bad usage exits 2.
package io.labelgrid.example;

import com.google.gson.Gson;
import com.google.protobuf.ByteString;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.stub.MetadataUtils;
import io.grpc.stub.StreamObserver;
import io.labelgrid.activelearning.v1.ActiveLearningServiceGrpc;
import io.labelgrid.activelearning.v1.NextSampleRequest;
import io.labelgrid.activelearning.v1.NextSampleResponse;
import io.labelgrid.common.v1.BlobInfo;
import io.labelgrid.common.v1.UploadFinish;
import io.labelgrid.datastore.v1.DatastoreServiceGrpc;
import io.labelgrid.datastore.v1.DownloadLabelRequest;
import io.labelgrid.datastore.v1.DownloadLabelResponse;
import io.labelgrid.datastore.v1.Image;
import io.labelgrid.datastore.v1.UploadImageHeader;
import io.labelgrid.datastore.v1.UploadImageRequest;
import io.labelgrid.datastore.v1.UploadImageResponse;
import io.labelgrid.inference.v1.InferParams;
import io.labelgrid.inference.v1.InferRequest;
import io.labelgrid.inference.v1.InferResponse;
import io.labelgrid.inference.v1.InferResultHeader;
import io.labelgrid.inference.v1.InferenceServiceGrpc;
import io.labelgrid.inference.v1.ListModelsRequest;
import io.labelgrid.inference.v1.Model;
import io.labelgrid.inference.v1.ResultOptions;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.nio.file.StandardCopyOption;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.time.Instant;
import java.util.HashMap;
import java.util.Iterator;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;

public final class LabelgridClient {
  private static final int CHUNK_BYTES = 1 << 20; // the contracts' largest chunk
  private static final Gson GSON = new Gson();

  private static final class UsageException extends Exception {
    UsageException(String message) {
      super(message);
    }
  }

  private final ManagedChannel channel;
  private final long timeoutSeconds;
  private final Metadata headers = new Metadata();

  private LabelgridClient(String target, String token, long timeoutSeconds) {
    this.channel =
        ManagedChannelBuilder.forTarget(target).usePlaintext().maxInboundMessageSize(8 << 20).build();
    this.timeoutSeconds = timeoutSeconds;
    if (!token.isEmpty()) {
      headers.put(Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER), "Bearer " + token);
    }
  }

  private InferenceServiceGrpc.InferenceServiceBlockingStub inference() {
    return InferenceServiceGrpc.newBlockingStub(channel)
        .withInterceptors(MetadataUtils.newAttachHeadersInterceptor(headers))
        .withDeadlineAfter(timeoutSeconds, TimeUnit.SECONDS);
  }

  private DatastoreServiceGrpc.DatastoreServiceBlockingStub datastore() {
    return DatastoreServiceGrpc.newBlockingStub(channel)
        .withInterceptors(MetadataUtils.newAttachHeadersInterceptor(headers))
        .withDeadlineAfter(timeoutSeconds, TimeUnit.SECONDS);
  }

  private static void emit(Map<String, Object> record) {
    System.out.println(GSON.toJson(record));
  }

  private static String hex(byte[] digest) {
    StringBuilder out = new StringBuilder();
    for (byte b : digest) {
      out.append(String.format("%02x", b));
    }
    return out.toString();
  }

  private static MessageDigest sha256() {
    try {
      return MessageDigest.getInstance("SHA-256");
    } catch (NoSuchAlgorithmException e) {
      throw new IllegalStateException(e);
    }
  }

  /** Writes chunks to a temp file beside out, checks size and sha256, then moves it into place. */
  private static Map<String, Object> receive(Path out, BlobInfo want, Iterator<ByteString> chunks)
      throws IOException {
    Path dir = out.toAbsolutePath().getParent();
    Path tmp = Files.createTempFile(dir, "." + out.getFileName(), ".part");
    try {
      MessageDigest digest = sha256();
      long size = 0;
      try (OutputStream file = Files.newOutputStream(tmp)) {
        while (chunks.hasNext()) {
          ByteString chunk = chunks.next();
          digest.update(chunk.asReadOnlyByteBuffer());
          chunk.writeTo(file);
          size += chunk.size();
        }
      }
      String got = hex(digest.digest());
      if (size != want.getSizeBytes() || !got.equals(want.getSha256().toLowerCase())) {
        throw new IOException(
            String.format("checksum mismatch: got %d bytes sha256 %s, server announced %d bytes sha256 %s",
                size, got, want.getSizeBytes(), want.getSha256()));
      }
      Files.move(tmp, out, StandardCopyOption.REPLACE_EXISTING, StandardCopyOption.ATOMIC_MOVE);
      Map<String, Object> record = new LinkedHashMap<>();
      record.put("path", out.toString());
      record.put("size_bytes", size);
      record.put("sha256", got);
      return record;
    } finally {
      Files.deleteIfExists(tmp);
    }
  }

  private void models() {
    for (Model model : inference().listModels(ListModelsRequest.getDefaultInstance()).getModelsList()) {
      Map<String, Object> record = new LinkedHashMap<>();
      record.put("model", model.getModelId());
      record.put("name", model.getName());
      record.put("labels", model.getLabelsMap());
      emit(record);
    }
  }

  private void upload(Path file, String imageId) throws Exception {
    long size = Files.size(file);
    CompletableFuture<UploadImageResponse> done = new CompletableFuture<>();
    StreamObserver<UploadImageRequest> requests =
        DatastoreServiceGrpc.newStub(channel)
            .withInterceptors(MetadataUtils.newAttachHeadersInterceptor(headers))
            .withDeadlineAfter(timeoutSeconds, TimeUnit.SECONDS)
            .uploadImage(
                new StreamObserver<UploadImageResponse>() {
                  @Override
                  public void onNext(UploadImageResponse value) {
                    done.complete(value);
                  }

                  @Override
                  public void onError(Throwable t) {
                    done.completeExceptionally(t);
                  }

                  @Override
                  public void onCompleted() {}
                });
    MessageDigest digest = sha256();
    try (InputStream in = Files.newInputStream(file)) {
      requests.onNext(
          UploadImageRequest.newBuilder()
              .setHeader(
                  UploadImageHeader.newBuilder()
                      .setImageId(imageId)
                      .setFileName(file.getFileName().toString())
                      .setSizeBytes(size))
              .build());
      byte[] buf = new byte[CHUNK_BYTES];
      int n;
      while ((n = in.readNBytes(buf, 0, buf.length)) > 0 && !done.isDone()) {
        digest.update(buf, 0, n);
        requests.onNext(UploadImageRequest.newBuilder().setChunk(ByteString.copyFrom(buf, 0, n)).build());
      }
      requests.onNext(
          UploadImageRequest.newBuilder()
              .setFinish(UploadFinish.newBuilder().setSha256(hex(digest.digest())))
              .build());
      requests.onCompleted();
    } catch (IOException e) {
      requests.onError(Status.CANCELLED.withDescription("local read failed").asRuntimeException());
      throw e;
    }
    Image image;
    try {
      image = done.get().getImage();
    } catch (ExecutionException e) {
      throw (e.getCause() instanceof Exception) ? (Exception) e.getCause() : e;
    }
    Map<String, Object> record = new LinkedHashMap<>();
    record.put("image", image.getImageId());
    record.put("size_bytes", image.getSizeBytes());
    record.put("sha256", image.getSha256());
    emit(record);
  }

  private void infer(String model, String image, Path out, String saveTag) throws IOException {
    InferRequest request =
        InferRequest.newBuilder()
            .setModel("models/" + model)
            .setImage("images/" + image)
            .setParams(
                InferParams.newBuilder()
                    .setResult(
                        ResultOptions.newBuilder().setSaveLabel(!saveTag.isEmpty()).setLabelTag(saveTag)))
            .build();
    Iterator<InferResponse> responses = inference().infer(request);
    InferResponse first = responses.hasNext() ? responses.next() : null;
    if (first == null || !first.hasHeader() || !first.getHeader().hasLabel()) {
      throw new IOException("the inference answer carries no label");
    }
    InferResultHeader header = first.getHeader();
    Map<String, Object> record =
        receive(
            out,
            header.getLabel(),
            new Iterator<ByteString>() {
              @Override
              public boolean hasNext() {
                return responses.hasNext();
              }

              @Override
              public ByteString next() {
                return responses.next().getChunk();
              }
            });
    record.put("model", model);
    record.put("image", image);
    record.put("label_names", new HashMap<>(header.getLabelNamesMap()));
    record.put("saved_label", header.getSavedLabel());
    record.put("device", header.getDevice());
    emit(record);
  }

  private void downloadLabel(String image, String tag, Path out) throws IOException {
    Iterator<DownloadLabelResponse> responses =
        datastore()
            .downloadLabel(
                DownloadLabelRequest.newBuilder().setName("images/" + image + "/labels/" + tag).build());
    DownloadLabelResponse first = responses.hasNext() ? responses.next() : null;
    if (first == null || !first.hasInfo()) {
      throw new IOException("the download did not start with the label's info");
    }
    Map<String, Object> record =
        receive(
            out,
            first.getInfo(),
            new Iterator<ByteString>() {
              @Override
              public boolean hasNext() {
                return responses.hasNext();
              }

              @Override
              public ByteString next() {
                return responses.next().getChunk();
              }
            });
    record.put("image", image);
    record.put("tag", tag);
    emit(record);
  }

  private void nextSample(String clientId, String strategy) {
    NextSampleResponse answer =
        ActiveLearningServiceGrpc.newBlockingStub(channel)
            .withInterceptors(MetadataUtils.newAttachHeadersInterceptor(headers))
            .withDeadlineAfter(timeoutSeconds, TimeUnit.SECONDS)
            .nextSample(
                NextSampleRequest.newBuilder()
                    .setStrategy("strategies/" + strategy)
                    .setClientId(clientId)
                    .build());
    Map<String, Object> record = new LinkedHashMap<>();
    if (!answer.hasImage()) {
      record.put("image", null);
      record.put("reason", answer.getNoSampleReason().name());
    } else {
      record.put("image", answer.getImage().getImageId());
      com.google.protobuf.Timestamp expire = answer.getLease().getExpireTime();
      record.put(
          "lease_expire_time",
          answer.getLease().hasExpireTime()
              ? Instant.ofEpochSecond(expire.getSeconds(), expire.getNanos()).toString()
              : "");
    }
    emit(record);
  }

  private static String need(Map<String, String> flags, String command, String name)
      throws UsageException {
    String value = flags.get(name);
    if (value == null || value.isEmpty()) {
      throw new UsageException(command + " needs --" + name);
    }
    return value;
  }

  private static int run(String[] args) throws Exception {
    Map<String, String> flags = new HashMap<>();
    flags.put("target", "127.0.0.1:8000");
    String token = System.getenv("LABELGRID_TOKEN");
    flags.put("token", token == null ? "" : token);
    flags.put("timeout-s", "120");
    flags.put("tag", "final");
    flags.put("strategy", "random");
    String command = null;
    for (int i = 0; i < args.length; i++) {
      if (args[i].startsWith("--")) {
        if (i + 1 >= args.length) {
          throw new UsageException(args[i] + " needs a value");
        }
        flags.put(args[i].substring(2), args[++i]);
      } else if (command == null) {
        command = args[i];
      } else {
        throw new UsageException("unexpected argument " + args[i]);
      }
    }
    if (command == null) {
      throw new UsageException("a command is required: models, upload, infer, download-label, next-sample");
    }
    long timeout;
    try {
      timeout = Long.parseLong(flags.get("timeout-s"));
    } catch (NumberFormatException e) {
      throw new UsageException("--timeout-s must be a number");
    }
    LabelgridClient client = new LabelgridClient(flags.get("target"), flags.get("token"), timeout);
    try {
      switch (command) {
        case "models":
          client.models();
          break;
        case "upload":
          client.upload(Paths.get(need(flags, command, "file")), flags.getOrDefault("image-id", ""));
          break;
        case "infer":
          client.infer(
              need(flags, command, "model"),
              need(flags, command, "image"),
              Paths.get(need(flags, command, "out")),
              flags.getOrDefault("save-tag", ""));
          break;
        case "download-label":
          client.downloadLabel(
              need(flags, command, "image"), flags.get("tag"), Paths.get(need(flags, command, "out")));
          break;
        case "next-sample":
          client.nextSample(need(flags, command, "client-id"), flags.get("strategy"));
          break;
        default:
          throw new UsageException("unknown command " + command);
      }
    } finally {
      client.channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }
    return 0;
  }

  public static void main(String[] args) {
    int code;
    try {
      code = run(args);
    } catch (UsageException e) {
      System.err.println("labelgrid-client: " + e.getMessage());
      code = 2;
    } catch (Exception e) {
      Map<String, Object> error = new LinkedHashMap<>();
      Status status = Status.fromThrowable(e);
      if (e instanceof StatusRuntimeException || status.getCode() != Status.Code.UNKNOWN) {
        error.put("code", status.getCode().name());
        error.put("message", status.getDescription());
      } else {
        error.put("code", "LOCAL");
        error.put("message", e.toString());
      }
      Map<String, Object> record = new LinkedHashMap<>();
      record.put("error", error);
      System.err.println(GSON.toJson(record));
      code = 1;
    }
    System.exit(code);
  }
}
