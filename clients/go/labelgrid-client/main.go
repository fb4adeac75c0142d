// Command labelgrid-client: labelgrid's gRPC services from Go, with the code protoc-gen-go and
// protoc-gen-go-grpc generate from protos/ (see clients/go/README.md and `make go-client`).
//
//	labelgrid-client [--target HOST:PORT] [--token T] [--timeout-s N] COMMAND [flags]
//
//	models                                           list the models inference serves
//	upload --file F [--image-id ID]                  upload a NIfTI file (1 MiB chunks, then its sha256)
//	infer --model M --image ID --out F [--save-tag T] run a model, stream the label to F, verify its sha256
//	download-label --image ID [--tag final] --out F  download a stored label to F, verify its sha256
//	next-sample --client-id C [--strategy random]    the next image active learning hands C
//
// Each result is one JSON object per line on stdout. An RPC error prints
// {"error": {"code": ..., "message": ...}} on stderr and exits 1; bad usage exits 2.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	alpb "github.com/labelgrid/labelgrid/gen/go/labelgrid/activelearning/v1"
	commonpb "github.com/labelgrid/labelgrid/gen/go/labelgrid/common/v1"
	dspb "github.com/labelgrid/labelgrid/gen/go/labelgrid/datastore/v1"
	infpb "github.com/labelgrid/labelgrid/gen/go/labelgrid/inference/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

const chunkBytes = 1 << 20 // the contracts' largest chunk

type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func emit(record map[string]interface{}) {
	line, _ := json.Marshal(record)
	fmt.Println(string(line))
}

// receiveTo writes chunks to a temp file beside path, checks the announced size and sha256,
// then renames it into place.
func receiveTo(path string, want *commonpb.BlobInfo, next func() ([]byte, bool, error)) (map[string]interface{}, error) {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*.part")
	if err != nil {
		return nil, err
	}
	defer os.Remove(tmp.Name())
	digest, size := sha256.New(), int64(0)
	for {
		chunk, more, err := next()
		if err != nil {
			tmp.Close()
			return nil, err
		}
		if !more {
			break
		}
		digest.Write(chunk)
		if _, err := tmp.Write(chunk); err != nil {
			tmp.Close()
			return nil, err
		}
		size += int64(len(chunk))
	}
	if err := tmp.Close(); err != nil {
		return nil, err
	}
	got := hex.EncodeToString(digest.Sum(nil))
	if size != want.GetSizeBytes() || got != strings.ToLower(want.GetSha256()) {
		return nil, fmt.Errorf("checksum mismatch: got %d bytes sha256 %s, server announced %d bytes sha256 %s",
			size, got, want.GetSizeBytes(), want.GetSha256())
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return nil, err
	}
	return map[string]interface{}{"path": path, "size_bytes": size, "sha256": got}, nil
}

func models(ctx context.Context, conn *grpc.ClientConn) error {
	answer, err := infpb.NewInferenceServiceClient(conn).ListModels(ctx, &infpb.ListModelsRequest{})
	if err != nil {
		return err
	}
	for _, m := range answer.GetModels() {
		emit(map[string]interface{}{"model": m.GetModelId(), "name": m.GetName(), "labels": m.GetLabels()})
	}
	return nil
}

func upload(ctx context.Context, conn *grpc.ClientConn, file, imageID string) error {
	f, err := os.Open(file)
	if err != nil {
		return err
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return err
	}
	stream, err := dspb.NewDatastoreServiceClient(conn).UploadImage(ctx)
	if err != nil {
		return err
	}
	header := &dspb.UploadImageHeader{ImageId: imageID, FileName: filepath.Base(file), SizeBytes: info.Size()}
	if err := stream.Send(&dspb.UploadImageRequest{Payload: &dspb.UploadImageRequest_Header{Header: header}}); err != nil {
		return streamErr(stream.CloseAndRecv())
	}
	digest, buf := sha256.New(), make([]byte, chunkBytes)
	for {
		n, readErr := io.ReadFull(f, buf)
		if n > 0 {
			digest.Write(buf[:n])
			chunk := append([]byte(nil), buf[:n]...)
			if err := stream.Send(&dspb.UploadImageRequest{Payload: &dspb.UploadImageRequest_Chunk{Chunk: chunk}}); err != nil {
				return streamErr(stream.CloseAndRecv())
			}
		}
		if readErr == io.EOF || readErr == io.ErrUnexpectedEOF {
			break
		} else if readErr != nil {
			return readErr
		}
	}
	sum := hex.EncodeToString(digest.Sum(nil))
	finish := &commonpb.UploadFinish{Sha256: sum}
	if err := stream.Send(&dspb.UploadImageRequest{Payload: &dspb.UploadImageRequest_Finish{Finish: finish}}); err != nil {
		return streamErr(stream.CloseAndRecv())
	}
	answer, err := stream.CloseAndRecv()
	if err != nil {
		return err
	}
	image := answer.GetImage()
	emit(map[string]interface{}{"image": image.GetImageId(), "size_bytes": image.GetSizeBytes(), "sha256": image.GetSha256()})
	return nil
}

// streamErr returns the RPC's real error when Send failed because the server ended the call.
func streamErr(_ interface{}, err error) error {
	if err == nil {
		return errors.New("the server ended the upload early")
	}
	return err
}

func infer(ctx context.Context, conn *grpc.ClientConn, model, image, out, saveTag string) error {
	request := &infpb.InferRequest{
		Model: "models/" + model,
		Image: "images/" + image,
		Params: &infpb.InferParams{Result: &infpb.ResultOptions{SaveLabel: saveTag != "", LabelTag: saveTag}},
	}
	stream, err := infpb.NewInferenceServiceClient(conn).Infer(ctx, request)
	if err != nil {
		return err
	}
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	header := first.GetHeader()
	if header == nil || header.GetLabel() == nil {
		return errors.New("the inference answer carries no label")
	}
	record, err := receiveTo(out, header.GetLabel(), func() ([]byte, bool, error) {
		message, err := stream.Recv()
		if err == io.EOF {
			return nil, false, nil
		} else if err != nil {
			return nil, false, err
		}
		return message.GetChunk(), true, nil
	})
	if err != nil {
		return err
	}
	record["model"], record["image"], record["label_names"] = model, image, header.GetLabelNames()
	record["saved_label"], record["device"] = header.GetSavedLabel(), header.GetDevice()
	emit(record)
	return nil
}

func downloadLabel(ctx context.Context, conn *grpc.ClientConn, image, tag, out string) error {
	name := "images/" + image + "/labels/" + tag
	stream, err := dspb.NewDatastoreServiceClient(conn).DownloadLabel(ctx, &dspb.DownloadLabelRequest{Name: name})
	if err != nil {
		return err
	}
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	if first.GetInfo() == nil {
		return errors.New("the download did not start with the label's info")
	}
	record, err := receiveTo(out, first.GetInfo(), func() ([]byte, bool, error) {
		message, err := stream.Recv()
		if err == io.EOF {
			return nil, false, nil
		} else if err != nil {
			return nil, false, err
		}
		return message.GetChunk(), true, nil
	})
	if err != nil {
		return err
	}
	record["image"], record["tag"] = image, tag
	emit(record)
	return nil
}

func nextSample(ctx context.Context, conn *grpc.ClientConn, clientID, strategy string) error {
	answer, err := alpb.NewActiveLearningServiceClient(conn).NextSample(ctx, &alpb.NextSampleRequest{
		Strategy: "strategies/" + strategy, ClientId: clientID,
	})
	if err != nil {
		return err
	}
	if answer.GetImage() == nil {
		emit(map[string]interface{}{"image": nil, "reason": answer.GetNoSampleReason().String()})
		return nil
	}
	expire := ""
	if answer.GetLease().GetExpireTime() != nil {
		expire = answer.GetLease().GetExpireTime().AsTime().UTC().Format(time.RFC3339)
	}
	emit(map[string]interface{}{"image": answer.GetImage().GetImageId(), "lease_expire_time": expire})
	return nil
}

func run(args []string) error {
	global := flag.NewFlagSet("labelgrid-client", flag.ContinueOnError)
	target := global.String("target", "127.0.0.1:8000", "HOST:PORT of Envoy (or of one service)")
	token := global.String("token", os.Getenv("LABELGRID_TOKEN"), "bearer token (env LABELGRID_TOKEN)")
	timeout := global.Int("timeout-s", 120, "deadline of each call in seconds")
	if err := global.Parse(args); err != nil {
		return usageError{err.Error()}
	}
	if global.NArg() == 0 {
		return usageError{"a command is required: models, upload, infer, download-label, next-sample"}
	}
	command, rest := global.Arg(0), global.Args()[1:]
	flags := flag.NewFlagSet(command, flag.ContinueOnError)
	file := flags.String("file", "", "file to upload")
	imageID := flags.String("image-id", "", "image id (upload: default from the file name)")
	image := flags.String("image", "", "image id")
	model := flags.String("model", "", "model id")
	out := flags.String("out", "", "file to write")
	saveTag := flags.String("save-tag", "", "also store the inference result as this label tag")
	tag := flags.String("tag", "final", "label tag")
	clientID := flags.String("client-id", "", "annotator id")
	strategy := flags.String("strategy", "random", "active learning strategy")
	if err := flags.Parse(rest); err != nil {
		return usageError{err.Error()}
	}
	need := func(name, value string) error {
		if value == "" {
			return usageError{fmt.Sprintf("%s needs --%s", command, name)}
		}
		return nil
	}

	conn, err := grpc.Dial(*target, grpc.WithInsecure(),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(8<<20), grpc.MaxCallSendMsgSize(8<<20)))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(*timeout)*time.Second)
	defer cancel()
	if *token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+*token)
	}
	switch command {
	case "models":
		return models(ctx, conn)
	case "upload":
		if err := need("file", *file); err != nil {
			return err
		}
		return upload(ctx, conn, *file, *imageID)
	case "infer":
		for name, value := range map[string]string{"model": *model, "image": *image, "out": *out} {
			if err := need(name, value); err != nil {
				return err
			}
		}
		return infer(ctx, conn, *model, *image, *out, *saveTag)
	case "download-label":
		for name, value := range map[string]string{"image": *image, "out": *out} {
			if err := need(name, value); err != nil {
				return err
			}
		}
		return downloadLabel(ctx, conn, *image, *tag, *out)
	case "next-sample":
		if err := need("client-id", *clientID); err != nil {
			return err
		}
		return nextSample(ctx, conn, *clientID, *strategy)
	}
	return usageError{"unknown command " + command}
}

func main() {
	err := run(os.Args[1:])
	if err == nil {
		return
	}
	var usage usageError
	if errors.As(err, &usage) {
		fmt.Fprintln(os.Stderr, "labelgrid-client:", usage.msg)
		os.Exit(2)
	}
	record := map[string]interface{}{"code": "LOCAL", "message": err.Error()}
	if s, ok := status.FromError(err); ok {
		record = map[string]interface{}{"code": s.Code().String(), "message": s.Message()}
	}
	line, _ := json.Marshal(map[string]interface{}{"error": record})
	fmt.Fprintln(os.Stderr, string(line))
	os.Exit(1)
}
